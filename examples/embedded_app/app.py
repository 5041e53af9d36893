"""A chat app that learns from its user while it federates: `python app.py [--data FILE]`.

Chat as usual; after an answer, tell the app what you thought of it:

    /good            the answer was right (an SFT example)
    /edit TEXT       the answer should have been TEXT (a preference pair, and an example)
    /regen           answer again (sampled); the new answer is preferred over the old one
    /status          what the federation is doing, what feedback this device holds
    /wait [SECONDS]  wait until the runtime serves a newer trained global adapter (300 s)
    /forget          delete the feedback kept on this device

The feedback is stored on this device only (`<state dir>/feedback/`, 0600, append-only). The
next federated round trains on it: the examples for an SFT task, the pairs for a DPO task
(`fedlm coordinator --method dpo`); only the adapter update leaves the device, and the new
global adapter is hot-swapped into the model that answers here.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from edge_sdk.client import ClientConfig, FederatedClient
from edge_sdk.client.feedback import FeedbackError
from edge_sdk.runtime import Answer, EdgeModel


def _served(model: EdgeModel) -> str:
    return model.adapter_path.name if model.adapter_path else "base model"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="smollm2-135m", help="model name or .gguf path")
    ap.add_argument("--data", nargs="*", default=[], help="local training files (optional)")
    ap.add_argument("--preferences", nargs="*", default=[], help="preference pair files (DPO)")
    ap.add_argument("--state-dir", default=str(Path.home() / ".fedlm" / "app"))
    ap.add_argument("--coordinator", default=None, help="URL; default: find it by mDNS")
    ap.add_argument("--insecure", action="store_true", help="allow a plain-HTTP coordinator")
    ap.add_argument("--idle-only", action="store_true", help="train only after 60 s without input")
    ap.add_argument("--max-tokens", type=int, default=128, help="longest answer in tokens")
    args = ap.parse_args()

    model = EdgeModel(args.model)
    last_input = time.monotonic()
    client = FederatedClient(
        ClientConfig(
            model=args.model,
            data=tuple(args.data),
            preferences=tuple(args.preferences),
            state_dir=Path(args.state_dir),
            coordinator_url=args.coordinator,
            insecure=args.insecure,
            threads=1,  # leave a core for chat
        ),
        runtime=model,  # every new global adapter is hot-swapped into this model
        schedule=(lambda: time.monotonic() - last_input > 60) if args.idle_only else None,
    )
    federation = threading.Thread(target=client.run, name="federation", daemon=True)
    federation.start()

    history: list[dict[str, str]] = []
    last: Answer | None = None
    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                break
            last_input = time.monotonic()
            command, _, rest = line.partition(" ")
            try:
                if command == "/good" and last is not None:
                    client.record_feedback(last, accepted=True)
                    print("noted: a good answer (kept on this device)")
                elif command == "/edit" and last is not None and rest:
                    client.record_feedback(last, accepted=False, edit=rest)
                    history[-1] = {"role": "assistant", "content": rest}
                    print("noted: your edit is preferred (kept on this device)")
                elif command == "/regen" and last is not None:
                    again = model.chat(history[:-1], max_tokens=args.max_tokens, temperature=0.8,
                                       seed=int(time.time()))  # fmt: skip
                    assert isinstance(again, Answer)
                    if again.strip() != last.strip():
                        client.record_feedback(last, regenerated=again)
                    last = again
                    history[-1] = {"role": "assistant", "content": str(again)}
                    print(f"model [{_served(model)}]> {again}")
                elif command == "/status":
                    counts = client.feedback.counts()
                    print(f"federation: {client.status}; serving {_served(model)}; feedback on "
                          f"this device: {counts.pairs} pairs, "
                          f"{counts.examples} examples")  # fmt: skip
                elif command == "/wait":
                    # Version 0 is the untrained start: wait for one the federation trained.
                    target = max(client.served_version, 0) + 1
                    deadline = time.monotonic() + float(rest or 300)
                    while client.served_version < target and time.monotonic() < deadline:
                        time.sleep(0.2)
                    print(f"serving {_served(model)}")
                elif command == "/forget":
                    client.forget_feedback()
                    print("feedback deleted from this device")
                elif command.startswith("/"):
                    print("commands: /good /edit TEXT /regen /status /wait [S] /forget "
                          "(after an answer)")  # fmt: skip
                elif line:
                    history.append({"role": "user", "content": line})
                    answer = model.chat(history, max_tokens=args.max_tokens)
                    assert isinstance(answer, Answer)
                    last = answer
                    history.append({"role": "assistant", "content": str(answer)})
                    print(f"model [{_served(model)}]> {answer}")
            except FeedbackError as exc:
                print(f"not recorded: {exc}")
    finally:
        client.stop()  # saves the checkpoint and any unsent update
        federation.join(timeout=60)
        model.close()


if __name__ == "__main__":
    main()
