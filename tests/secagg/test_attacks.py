"""Attacks on the protocol, as a curious coordinator, an enrolled device and a replaying host."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

from edge_sdk.secagg import (
    ConsistencyError,
    DecryptionError,
    DeviceSession,
    DeviceState,
    MaskedInputRequest,
    ProtocolViolationError,
    ReconstructionError,
    ReplayError,
    SecAggParams,
    ServerRound,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskResponse,
    crypto,
    quantize,
)
from edge_sdk.secagg.device import share_associated_data, share_plaintext
from tests.secagg.helpers import Round, assert_sum_within_grid, make_round, run, wire

PARAMS = SecAggParams(cohort_size=8, vector_len=129, clip=1.0, grid_bits=6, weight_cap=50)


def _to_phase(r: Round, phase: str) -> dict:
    """Drive the round honestly up to the requests of `phase`; returns those requests."""
    s = r.server
    for d in r.devices.values():
        s.receive(wire(d.advertise()))
    reqs = s.close_advertise()
    if phase == "share_keys":
        return reqs
    for i, req in reqs.items():
        s.receive(wire(r.devices[i].share_keys(wire(req))))
    reqs = s.close_share_keys()
    if phase == "masked_input":
        return reqs
    for i, req in reqs.items():
        s.receive(wire(r.devices[i].masked_input(wire(req), r.updates[i], r.weights[i])))
    return s.close_masked_input()


# --- curious coordinator: the consistency check ------------------------------------------------


def test_device_refuses_both_kinds_of_share_of_one_device() -> None:
    r = make_round(PARAMS, 8, seed=20)
    reqs = _to_phase(r, "unmask")
    honest = reqs[1]
    hostile = UnmaskRequest(honest.round_id, 1, honest.active, (*honest.dropped, 5))
    with pytest.raises(ConsistencyError, match=r"both the seed share and the mask-key share"):
        r.devices[1].unmask(wire(hostile))
    assert r.devices[1].state is DeviceState.ABORTED
    # And an aborted device reveals nothing afterwards, even to an honest request.
    with pytest.raises(Exception, match="expected nothing"):
        r.devices[1].unmask(wire(honest))


def test_device_answers_unmask_only_once() -> None:
    """Asking again (e.g. first as active, then as dropped) is refused."""
    r = make_round(PARAMS, 8, seed=21)
    reqs = _to_phase(r, "unmask")
    first = r.devices[2].unmask(wire(reqs[2]))
    assert 5 in first.seed_shares and not first.key_shares
    flipped = UnmaskRequest(reqs[2].round_id, 2, tuple(i for i in reqs[2].active if i != 5), (5,))
    with pytest.raises(ConsistencyError, match="already answered"):
        r.devices[2].unmask(wire(flipped))


def test_split_requests_give_the_server_too_few_of_either_kind() -> None:
    """A server that tells half of j's neighbours 'j is active' and the other half 'j dropped'
    gets fewer than t shares of each kind (t > k/2), so it recovers neither secret."""
    r = make_round(PARAMS, 8, seed=22)
    reqs = _to_phase(r, "unmask")
    target = 8
    others = [i for i in reqs if i != target]
    half_a, half_b = others[: len(others) // 2 + 1], others[len(others) // 2 + 1 :]
    seed_shares, key_shares = [], []
    for i in half_a:
        resp = r.devices[i].unmask(wire(reqs[i]))
        seed_shares.append(resp.seed_shares[target])
    for i in half_b:
        active = tuple(j for j in reqs[i].active if j != target)
        resp = r.devices[i].unmask(wire(UnmaskRequest(reqs[i].round_id, i, active, (target,))))
        key_shares.append(resp.key_shares[target])
    t = PARAMS.threshold
    assert len(seed_shares) < t or len(key_shares) < t
    # The kind it has fewer of does not reconstruct to the right secret.
    mask_key = r.server._keys[target][0]
    guess = crypto.private_from_bytes(crypto.combine_secret(key_shares))
    assert crypto.public_bytes(guess) != mask_key


def test_device_refuses_a_neighbour_set_that_is_not_the_graphs() -> None:
    params = dataclasses.replace(PARAMS, cohort_size=12, degree=4, threshold=3)
    r = make_round(params, 12, seed=23)
    reqs = _to_phase(r, "share_keys")
    req = reqs[1]
    extra = next(j for j in reqs if j != 1 and j not in req.keys)
    keys = dict(req.keys)
    keys[extra] = reqs[extra].keys[next(iter(reqs[extra].keys))]  # any real key pair
    forged = ShareKeysRequest(req.round_id, 1, req.graph_seed, req.members, keys)
    with pytest.raises(ProtocolViolationError, match="graph's neighbours"):
        r.devices[1].share_keys(wire(forged))
    assert r.devices[1].state is DeviceState.ABORTED


def test_device_refuses_its_own_keys_echoed_back() -> None:
    r = make_round(PARAMS, 8, seed=24)
    reqs = _to_phase(r, "share_keys")
    req = reqs[1]
    own = (r.server._keys[1][0], r.server._keys[1][1])
    keys = dict(req.keys)
    keys[next(iter(keys))] = own
    forged = ShareKeysRequest(req.round_id, 1, req.graph_seed, req.members, keys)
    with pytest.raises(ProtocolViolationError, match="reused"):
        r.devices[1].share_keys(wire(forged))


def test_device_refuses_a_tampered_share() -> None:
    r = make_round(PARAMS, 8, seed=25)
    reqs = _to_phase(r, "masked_input")
    req = reqs[1]
    sender = next(iter(req.shares))
    blob = bytearray(req.shares[sender])
    blob[-1] ^= 1
    shares = dict(req.shares)
    shares[sender] = bytes(blob)
    with pytest.raises(
        DecryptionError, match=r"device 1: share from 2: encrypted share does not verify for"
    ):
        r.devices[1].masked_input(
            wire(MaskedInputRequest(req.round_id, 1, shares)), r.updates[1], r.weights[1]
        )


def test_device_refuses_a_share_redirected_from_another_pair() -> None:
    """The server forwards to device 1 a share that device 3 encrypted for device 2."""
    r = make_round(PARAMS, 8, seed=26)
    reqs = _to_phase(r, "masked_input")
    shares = dict(reqs[1].shares)
    shares[3] = reqs[2].shares[3]
    with pytest.raises(
        DecryptionError, match=r"device 1: share from 3: encrypted share does not verify for"
    ):
        r.devices[1].masked_input(
            wire(MaskedInputRequest(reqs[1].round_id, 1, shares)), r.updates[1], r.weights[1]
        )


def test_device_refuses_a_request_of_another_round() -> None:
    r = make_round(PARAMS, 8, seed=27)
    reqs = _to_phase(r, "share_keys")
    req = reqs[1]
    other = ShareKeysRequest(b"\x00" * 16, 1, req.graph_seed, req.members, req.keys)
    with pytest.raises(ProtocolViolationError, match="message for round"):
        r.devices[1].share_keys(wire(other))


# --- replay of masked inputs -----------------------------------------------------------------


def _masked_input(r: Round, i: int):
    reqs = _to_phase(r, "masked_input")
    return reqs, r.devices[i].masked_input(wire(reqs[i]), r.updates[i], r.weights[i])


def test_replayed_masked_input_from_another_round_is_refused() -> None:
    old = make_round(PARAMS, 8, seed=28)
    _, old_input = _masked_input(old, 1)
    new = make_round(PARAMS, 8, seed=29)
    _to_phase(new, "masked_input")
    # As sent: wrong round id.
    with pytest.raises(ProtocolViolationError, match="sent to round"):
        new.server.receive(wire(old_input))
    # With the round id rewritten by a replaying host: the tag does not verify.
    forged = dataclasses.replace(old_input, round_id=new.server.round_id)
    with pytest.raises(ReplayError, match="not bound to round"):
        new.server.receive(wire(forged))


def test_replayed_masked_input_into_another_cohort_with_the_same_round_id_is_refused() -> None:
    old = make_round(PARAMS, 8, seed=30)
    _, old_input = _masked_input(old, 1)
    # Same round id, another cohort (7 devices, new keys): the binding differs.
    new = make_round(PARAMS, 7, seed=31)
    new.server = ServerRound(PARAMS, round_id=old.server.round_id)
    new.devices = {i: DeviceSession(wire(new.server.setup(i))) for i in range(1, 8)}
    _to_phase(new, "masked_input")
    with pytest.raises(ReplayError, match=r"device 1: masked input is not bound to round"):
        new.server.receive(wire(old_input))


def test_a_device_cannot_submit_anothers_masked_input_as_its_own() -> None:
    r = make_round(PARAMS, 8, seed=32)
    _, one = _masked_input(r, 1)
    stolen = dataclasses.replace(one, device_id=2)
    with pytest.raises(ReplayError, match=r"device 2: masked input is not bound to round"):
        r.server.receive(wire(stolen))
    r.server.receive(wire(one))
    with pytest.raises(ProtocolViolationError, match="may not send a masked input now"):
        r.server.receive(wire(one))  # resubmission in the same round


def test_masked_input_of_the_wrong_length_is_refused() -> None:
    r = make_round(PARAMS, 8, seed=33)
    _, one = _masked_input(r, 1)
    short = dataclasses.replace(one, payload=one.payload[:-1])
    with pytest.raises(ProtocolViolationError, match="bytes, expected"):
        r.server.receive(wire(short))


# --- hostile devices against the server ------------------------------------------------------


def test_server_refuses_a_second_advert_and_reused_keys() -> None:
    r = make_round(PARAMS, 8, seed=34)
    s = r.server
    a1 = wire(r.devices[1].advertise())
    s.receive(a1)
    with pytest.raises(ProtocolViolationError, match="already advertised"):
        s.receive(a1)
    copy = dataclasses.replace(a1, device_id=2)
    with pytest.raises(ProtocolViolationError, match="already in use"):
        s.receive(copy)
    with pytest.raises(ProtocolViolationError, match="not invited"):
        s.receive(dataclasses.replace(a1, device_id=99))


def test_server_refuses_shares_it_did_not_ask_for_or_with_a_wrong_index() -> None:
    r = make_round(PARAMS, 8, seed=35)
    reqs = _to_phase(r, "unmask")
    resp = r.devices[1].unmask(wire(reqs[1]))
    owner, (index, share) = next(iter(resp.seed_shares.items()))
    wrong_kind = UnmaskResponse(resp.round_id, 1, {}, {owner: (index, share)})
    with pytest.raises(ProtocolViolationError, match="not asked for"):
        r.server.receive(wire(wrong_kind))
    seeds = dict(resp.seed_shares)
    seeds[owner] = (index % 7 + 1, share)
    with pytest.raises(ProtocolViolationError, match="wrong index"):
        r.server.receive(wire(UnmaskResponse(resp.round_id, 1, seeds, {})))
    r.server.receive(wire(resp))


# --- what the coordinator stores: independent of the plain update ------------------------------


def test_stored_masked_vector_is_independent_of_the_plain_update() -> None:
    """The masked vector the server stores is uniform on Z_{2^b} and uncorrelated with the
    device's plain grid vector, even for a strongly structured update; the same tests reject
    the plain vector itself, so they can fail."""
    params = SecAggParams(cohort_size=5, vector_len=40_000, clip=1.0, grid_bits=4, weight_cap=10)
    r = make_round(params, 5, seed=36)
    n = params.vector_len
    r.updates[1] = np.sin(np.linspace(0, 60 * np.pi, n))  # structured, spans the grid
    _, masked = _masked_input(r, 1)
    stored = quantize.unpack(masked.payload, params)[:-1].astype(np.int64)  # (N,)
    plain = quantize.encode(r.updates[1], r.weights[1], params, np.random.default_rng(0))
    plain = plain[:-1].astype(np.int64)
    size = 1 << params.ring_bits

    def checks(values: np.ndarray) -> tuple[float, float, float]:
        uniform = stats.chisquare(np.bincount(values, minlength=size)).pvalue
        corr = stats.pearsonr(values, plain).pvalue
        # Contingency of plain level x the value's low 3 bits: independent iff p is large.
        table = np.zeros((plain.max() + 1, 8))
        np.add.at(table, (plain, values & 7), 1)
        table = table[table.sum(axis=1) > 0][:, table.sum(axis=0) > 0]
        indep = stats.chi2_contingency(table).pvalue
        return uniform, corr, indep

    uniform, corr, indep = checks(stored)
    # Keys are fresh per run, so each check fails by chance with p = 1e-6 only.
    assert uniform > 1e-6 and corr > 1e-6 and indep > 1e-6, (uniform, corr, indep)
    # Control: the unmasked vector fails every one of them.
    u0, c0, i0 = checks(plain)
    assert u0 < 1e-10 and c0 < 1e-10 and i0 < 1e-10


def test_server_state_holds_only_masked_vectors() -> None:
    """After a round, the only vectors the server keeps are the masked payloads."""
    r = make_round(PARAMS, 8, seed=37)
    run(r)
    stored = r.server._inputs
    for i, payload in stored.items():
        plain = quantize.encode(r.updates[i], r.weights[i], PARAMS, np.random.default_rng(1))
        masked = quantize.unpack(payload, PARAMS)
        assert np.mean(masked[:-1] == plain[:-1]) < 0.05  # ≈ 1/2^b by chance
        assert masked[-1] != r.weights[i]


def test_one_wrong_revealed_share_is_survived() -> None:
    """A device that reveals a wrong seed share (right index) cannot spoil the sum while more
    than t shares arrived: the server finds a subset that matches the commitment."""
    r = make_round(PARAMS, 8, seed=40)
    reqs = _to_phase(r, "unmask")
    for i, req in reqs.items():
        resp = wire(r.devices[i].unmask(wire(req)))
        if i == 2:
            seeds = dict(resp.seed_shares)
            index, share = seeds[5]
            seeds[5] = (index, bytes(b ^ 0x5A for b in share))
            resp = UnmaskResponse(resp.round_id, 2, seeds, resp.key_shares)
        r.server.receive(resp)
    result = r.server.close_unmask()
    assert_sum_within_grid(r, result)


def test_a_wrong_share_with_no_spare_fails_loudly() -> None:
    """With exactly t shares of a device and one of them wrong, the server raises instead of
    returning a sum with a self-mask left in it."""
    r = make_round(PARAMS, 8, seed=41)
    reqs = _to_phase(r, "unmask")
    silent = {7, 8}  # k - t = 2 never answer: device 1's seed then has exactly t = 5 shares
    for i, req in reqs.items():
        if i in silent:
            continue
        resp = wire(r.devices[i].unmask(wire(req)))
        if i == 2:
            seeds = dict(resp.seed_shares)
            index, _ = seeds[1]
            seeds[1] = (index, bytes(32))
            resp = UnmaskResponse(resp.round_id, 2, seeds, resp.key_shares)
        r.server.receive(resp)
    with pytest.raises(ReconstructionError, match="device 1's seed"):
        r.server.close_unmask()


def test_a_hostile_neighbour_cannot_plant_a_malformed_share() -> None:
    """Device 3 encrypts, under the right pair key, a share with a wrong index for device 1.
    Device 1 refuses it and leaves; the round goes on without it (a drop-out after sharing)."""
    r = make_round(PARAMS, 8, seed=42)
    reqs = _to_phase(r, "masked_input")
    hostile, victim = r.devices[3], r.devices[1]
    binding = hostile._binding
    key = crypto.share_key(hostile._enc_sk, r.server._keys[1][1], binding)
    plain = share_plaintext(3, 1, 7, bytes(32), bytes(32))  # index 7 is not device 1's
    shares = dict(reqs[1].shares)
    shares[3] = crypto.encrypt(key, plain, share_associated_data(binding, 3, 1))
    with pytest.raises(DecryptionError, match="malformed"):
        victim.masked_input(
            wire(MaskedInputRequest(reqs[1].round_id, 1, shares)), r.updates[1], r.weights[1]
        )
    assert victim.state is DeviceState.ABORTED
    for i, req in reqs.items():
        if i != 1:
            r.server.receive(wire(r.devices[i].masked_input(wire(req), r.updates[i], r.weights[i])))
    unmask = r.server.close_masked_input()
    assert unmask[2].dropped == (1,)
    for i, req in unmask.items():
        r.server.receive(wire(r.devices[i].unmask(wire(req))))
    result = r.server.close_unmask()
    assert 1 in result.dropped
    assert_sum_within_grid(r, result)


def test_device_refuses_a_member_list_with_repeats_or_without_itself() -> None:
    r = make_round(PARAMS, 8, seed=43)
    reqs = _to_phase(r, "share_keys")
    req = reqs[1]
    cases = {1: (*req.members, 2), 2: tuple(m for m in req.members if m != 2)}
    for i, members in cases.items():
        forged = ShareKeysRequest(req.round_id, i, req.graph_seed, members, reqs[i].keys)
        with pytest.raises(ProtocolViolationError, match="member list"):
            r.devices[i].share_keys(forged)
        assert r.devices[i].state is DeviceState.ABORTED


def test_server_setup_checks_ids_and_cohort_size() -> None:
    s = ServerRound(PARAMS)
    with pytest.raises(ValueError, match=r"\[0, 4294967295\], got 4294967296"):
        s.setup(2**32)
    with pytest.raises(TypeError, match="int"):
        s.setup("1")  # type: ignore[arg-type]
    for i in range(8):
        s.setup(i)
    with pytest.raises(ValueError, match="already invited"):
        s.setup(3)
    with pytest.raises(ValueError, match="cohort is full"):
        s.setup(9)


def _forging(monkeypatch: pytest.MonkeyPatch, victim: np.ndarray, forge) -> None:
    """Make the device whose update is `victim` mask `forge(plain ring vector)` instead: what
    a malicious device's own code can do (the server only ever sees the masked result)."""
    from edge_sdk.secagg import device as device_module

    honest = device_module.quantize.encode

    def encode(update, weight, params, rng, noise=None):
        ring = honest(update, weight, params, rng, noise)
        return forge(ring) if update is victim else ring

    monkeypatch.setattr(device_module.quantize, "encode", encode)


def test_a_weight_outside_its_range_is_caught_in_the_sum(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device that masks a weight beyond the cap (to scale the mean up or down) makes the
    masked weights sum outside [0, s·W]: the server refuses the round instead of publishing."""
    r = make_round(PARAMS, 8, seed=21)

    def big_weight(ring: np.ndarray) -> np.ndarray:
        ring[-1] = np.uint32(1 << 31)
        return ring

    _forging(monkeypatch, r.updates[1], big_weight)
    with pytest.raises(ProtocolViolationError, match="weights of 8 devices sum to"):
        run(r)
    assert r.server.state.value == "FAILED"


def test_values_outside_the_grid_move_the_mean_at_most_to_the_clip(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A device can mask any residue of the ring, not only grid indices: the server cannot see
    it. What it can do is bounded: the published mean stays in [-C, C] per coordinate (the
    range of honest means), although this device pushes every coordinate far from the honest
    mean."""
    r = make_round(PARAMS, 8, seed=22)

    def top_residue(ring: np.ndarray) -> np.ndarray:
        ring[:-1] = np.uint32(1 << (PARAMS.ring_bits - 1))  # 4x the grid's top index 2^g - 1
        return ring

    _forging(monkeypatch, r.updates[1], top_residue)
    result = run(r)
    honest = {i: r.updates[i] for i in r.updates if i != 1}
    exact = sum(np.clip(x, -1.0, 1.0) * r.weights[i] for i, x in honest.items())
    exact /= sum(r.weights[i] for i in honest)
    raw = quantize.weighted_mean(result.sum_weighted, result.total_weight, PARAMS)
    assert raw.max() > 2 * PARAMS.clip  # unclipped, the forged values would dominate
    assert np.abs(result.mean).max() <= PARAMS.clip
    assert np.abs(result.mean - exact).mean() > 0.5  # the attack moved it: bounded, not stopped
