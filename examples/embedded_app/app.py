"""A chat app that keeps serving while it federates: `python app.py --data FILE`."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from edge_sdk.client import ClientConfig, FederatedClient
from edge_sdk.runtime import EdgeModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", nargs="+", required=True, help="local training files")
    ap.add_argument("--state-dir", default=str(Path.home() / ".fedlm" / "app"))
    ap.add_argument("--coordinator", default=None, help="URL; default: find it by mDNS")
    ap.add_argument("--idle-only", action="store_true", help="train only after 60 s without input")
    args = ap.parse_args()

    model = EdgeModel("smollm2-135m")
    last_input = time.monotonic()
    client = FederatedClient(
        ClientConfig(
            model="smollm2-135m",
            data=tuple(args.data),
            state_dir=Path(args.state_dir),
            coordinator_url=args.coordinator,
            threads=1,
        ),  # leave a core for chat
        runtime=model,  # every new global adapter is hot-swapped into this model
        schedule=(lambda: time.monotonic() - last_input > 60) if args.idle_only else None,
    )
    federation = threading.Thread(target=client.run, name="federation", daemon=True)
    federation.start()

    history: list[dict[str, str]] = []
    try:
        while True:
            try:
                question = input("you> ")
            except EOFError:
                break
            last_input = time.monotonic()
            history.append({"role": "user", "content": question})
            answer = model.chat(history, max_tokens=128)
            history.append({"role": "assistant", "content": str(answer)})
            adapter = model.adapter_path.name if model.adapter_path else "base model"
            print(f"model [{adapter}]> {answer}")
    finally:
        client.stop()  # saves the checkpoint and any unsent update
        federation.join(timeout=60)
        model.close()


if __name__ == "__main__":
    main()
