"""Activation serving: fan-out bookkeeping, the shuffle buffer, and the Ray server with its clients.

The Ray tests run a real local Ray (the session fixture ``ray_session``), the embedded
SmolLM2-135M model and the embedded Shakespeare corpus. They keep hookpoints in the first
blocks and windows short, so each forward pass is cheap.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from saesweep.activations.client import ActivationClient
from saesweep.activations.embedded import prepare_embedded_model
from saesweep.activations.fanout import FanOut, HeldBatch
from saesweep.activations.models import load_model, model_info, run_hookpoints
from saesweep.activations.server import ServerConfig, open_token_stream, start_server
from saesweep.activations.shuffle import ShuffleBuffer


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def publish(fanout: FanOut, hookpoints: list[str], n_tokens: int = 10) -> int:
    seq = fanout.next_seq
    fanout.publish(seq, {h: HeldBatch(seq, f"{h}#{seq}", n_tokens) for h in hookpoints})
    return seq


# -- fan-out bookkeeping ---------------------------------------------------------------------


def test_fanout_every_subscriber_gets_every_batch():
    fanout = FanOut(max_batches_in_flight=2, subscriber_timeout_s=60)
    a = fanout.subscribe("h0")
    b = fanout.subscribe("h0")
    c = fanout.subscribe("h1")
    received = {a.subscriber_id: [], b.subscriber_id: [], c.subscriber_id: []}
    cursors = {sid: 0 for sid in received}
    stop = threading.Event()
    for _ in range(6):
        assert fanout.wait_for_room(stop) is not None
        publish(fanout, ["h0", "h1"])
        for sid in received:
            batches = fanout.poll(sid, cursors[sid], max_batches=8, timeout_s=0)
            received[sid].extend(batch.handle for batch in batches)
            cursors[sid] = batches[-1].seq + 1
    assert received[a.subscriber_id] == [f"h0#{i}" for i in range(6)]
    assert received[b.subscriber_id] == [f"h0#{i}" for i in range(6)]
    assert received[c.subscriber_id] == [f"h1#{i}" for i in range(6)]


def test_fanout_releases_acknowledged_batches():
    fanout = FanOut(max_batches_in_flight=3, subscriber_timeout_s=60)
    a = fanout.subscribe("h0")
    b = fanout.subscribe("h0")
    for _ in range(3):
        publish(fanout, ["h0"])
    assert fanout.held_counts() == {"h0": 3}
    fanout.poll(a.subscriber_id, next_seq=3, max_batches=8, timeout_s=0)
    assert fanout.held_counts() == {"h0": 3}, "b still needs every batch"
    fanout.poll(b.subscriber_id, next_seq=2, max_batches=8, timeout_s=0)
    assert fanout.held_counts() == {"h0": 1}
    stats = fanout.subscriber_stats()
    assert stats[a.subscriber_id]["delivered_tokens"] == 30
    assert stats[b.subscriber_id]["delivered_batches"] == 2


def test_fanout_backpressure_waits_for_slowest():
    fanout = FanOut(max_batches_in_flight=2, subscriber_timeout_s=60)
    slow = fanout.subscribe("h0")
    fast = fanout.subscribe("h0")
    stop = threading.Event()
    publish(fanout, ["h0"])
    publish(fanout, ["h0"])
    fanout.poll(fast.subscriber_id, next_seq=2, max_batches=8, timeout_s=0)

    waiter = threading.Thread(target=fanout.wait_for_room, args=(stop, 0.05))
    waiter.start()
    waiter.join(timeout=0.5)
    assert waiter.is_alive(), "the producer must wait while the slow subscriber is 2 batches behind"

    fanout.poll(slow.subscriber_id, next_seq=1, max_batches=8, timeout_s=0)
    waiter.join(timeout=10)
    assert not waiter.is_alive()


def test_fanout_producer_waits_without_subscribers():
    fanout = FanOut(max_batches_in_flight=2, subscriber_timeout_s=60)
    stop = threading.Event()
    result = []
    waiter = threading.Thread(target=lambda: result.append(fanout.wait_for_room(stop, 0.05)))
    waiter.start()
    waiter.join(timeout=0.3)
    assert waiter.is_alive()
    stop.set()
    waiter.join(timeout=10)
    assert result == [None]


def test_fanout_late_subscriber_joins_current_batch():
    fanout = FanOut(max_batches_in_flight=4, subscriber_timeout_s=60)
    early = fanout.subscribe("h0")
    for _ in range(3):
        publish(fanout, ["h0"])
    late = fanout.subscribe("h0")
    assert late.start_seq == 2
    batches = fanout.poll(late.subscriber_id, late.start_seq, max_batches=8, timeout_s=0)
    assert [b.seq for b in batches] == [2]
    other = fanout.subscribe("h1")
    assert other.start_seq == 3
    assert early.start_seq == 0


def test_fanout_unsubscribe_unblocks_producer():
    fanout = FanOut(max_batches_in_flight=1, subscriber_timeout_s=60)
    leaving = fanout.subscribe("h0")
    stays = fanout.subscribe("h0")
    publish(fanout, ["h0"])
    fanout.poll(stays.subscriber_id, next_seq=1, max_batches=1, timeout_s=0)
    assert fanout.unsubscribe(leaving.subscriber_id)
    assert fanout.wait_for_room(threading.Event()) == 1
    assert fanout.held_counts() == {}
    assert fanout.poll(leaving.subscriber_id, 1, 1, 0) is None


def test_fanout_expires_silent_subscriber():
    clock = FakeClock()
    fanout = FanOut(max_batches_in_flight=1, subscriber_timeout_s=30, clock=clock)
    fanout.subscribe("h0")
    live = fanout.subscribe("h0")
    publish(fanout, ["h0"])
    clock.now = 20.0
    fanout.poll(live.subscriber_id, next_seq=1, max_batches=1, timeout_s=0)
    clock.now = 40.0
    assert fanout.wait_for_room(threading.Event()) == 1
    assert fanout.expired_subscribers == 1
    assert list(fanout.subscriber_stats()) == [live.subscriber_id]


def test_fanout_resume_seq_sets_stream_start():
    fanout = FanOut(max_batches_in_flight=2, subscriber_timeout_s=60)
    first = fanout.subscribe("h0", resume_seq=7)
    assert first.start_seq == 7
    assert fanout.next_seq == 7
    second = fanout.subscribe("h1", resume_seq=9)
    assert second.start_seq == 7, "only the first subscriber sets the start"
    publish(fanout, ["h0", "h1"])
    third = fanout.subscribe("h0", resume_seq=12)
    assert third.start_seq == 7, "a stream already under way keeps its numbering"


def test_fanout_failure_reaches_polls():
    fanout = FanOut(max_batches_in_flight=2, subscriber_timeout_s=60)
    sub = fanout.subscribe("h0")
    fanout.fail(ValueError("tokenizer exploded"))
    with pytest.raises(RuntimeError, match="tokenizer exploded"):
        fanout.poll(sub.subscriber_id, 0, 1, 0)


# -- shuffle buffer --------------------------------------------------------------------------


def test_shuffle_buffer_mixes_chunks():
    buffer = ShuffleBuffer(capacity_tokens=64, seed=0)
    # Each chunk is 16 tokens whose single feature is the chunk's index.
    for chunk_index in range(8):
        buffer.add(torch.full((16, 1), float(chunk_index)))
    buffer.flush()
    out = buffer.take(buffer.ready_tokens)
    assert out.shape == (128, 1)
    assert sorted(out[:, 0].tolist()) == sorted(float(i) for i in range(8) for _ in range(16))
    first_batch = out[:16, 0]
    assert len(set(first_batch.tolist())) >= 3, "a batch must mix tokens from several chunks"


def test_shuffle_buffer_is_seeded():
    def run(seed: int) -> torch.Tensor:
        buffer = ShuffleBuffer(capacity_tokens=32, seed=seed)
        for start in range(0, 96, 16):
            buffer.add(torch.arange(start, start + 16, dtype=torch.float32)[:, None])
        buffer.flush()
        return buffer.take(96)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_shuffle_buffer_zero_capacity_keeps_order():
    buffer = ShuffleBuffer(capacity_tokens=0)
    buffer.add(torch.arange(5.0)[:, None])
    buffer.add(torch.arange(5.0, 9.0)[:, None])
    assert buffer.take(7)[:, 0].tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert buffer.ready_tokens == 2


# -- the Ray server and its clients ----------------------------------------------------------

MODEL = "smollm2-135m"
D_MODEL = 576
HOOK_A = "blocks.0.hook_resid_post"
HOOK_B = "blocks.1.hook_resid_post"
READ_TIMEOUT_S = 900


def server_config(**overrides) -> ServerConfig:
    settings = dict(
        hookpoints=(HOOK_A, HOOK_B),
        model=MODEL,
        context_size=64,
        sequences_per_batch=4,
        max_batches_in_flight=2,
        norm_estimate_tokens=1024,
        seed=0,
    )
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture(scope="module")
def embedded_model_dir():
    # Prepare the model once here, so that the actors and this process only load it.
    return prepare_embedded_model()


@pytest.fixture(scope="module")
def server(ray_session, embedded_model_dir):
    handle = start_server(server_config(), max_restarts=0)
    yield handle
    ray.kill(handle)


@pytest.fixture(scope="module")
def local_models(embedded_model_dir):
    """In-process copies of the served model, by dtype, loaded on first use."""
    models = {}

    def get(dtype: str = "float32"):
        if dtype not in models:
            models[dtype] = load_model(MODEL, dtype=dtype)
        return models[dtype]

    return get


def reference_activations(
    local_model, config: ServerConfig, seqs: list[int]
) -> dict[str, dict[int, torch.Tensor]]:
    """Recompute in this process the served [n_tokens, d_in] batches with sequence numbers ``seqs``."""
    bridge, tokenizer = local_model
    policy = model_info(config.model).token_policy()
    requested = set(seqs)
    reference: dict[str, dict[int, torch.Tensor]] = {h: {} for h in config.hookpoints}
    for seq, batch in enumerate(open_token_stream(config, tokenizer, policy)):
        if seq > max(requested):
            break
        if seq not in requested:
            continue
        activations = run_hookpoints(bridge, batch.tokens, list(config.hookpoints))
        for hookpoint in config.hookpoints:
            reference[hookpoint][seq] = activations[hookpoint][batch.keep].float()
    return reference


def delivered_by_seq(client: ActivationClient, delivered: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Split what an unshuffled client delivered back into its served batches, whole ones only."""
    tokens = torch.cat(delivered)
    batches = {}
    start = 0
    for seq, n_tokens in client.batches_received:
        if start + n_tokens > tokens.shape[0]:
            break
        batches[seq] = tokens[start : start + n_tokens]
        start += n_tokens
    return batches


class Readers:
    """Read ``n`` batches from each client, one thread per client, as separate trainers would.

    With ``close=True`` a client is closed after its last batch, as a finished trainer does.
    A client left open blocks the producer once the others are far enough ahead of it.
    """

    def __init__(self, jobs: list[tuple[ActivationClient, int]], close: bool = False):
        self.close = close
        self.results: list[list[torch.Tensor]] = [[] for _ in jobs]
        self.errors: list[BaseException] = []
        self.threads = [
            threading.Thread(target=self._read, args=(i, client, n), daemon=True)
            for i, (client, n) in enumerate(jobs)
        ]
        for thread in self.threads:
            thread.start()

    def _read(self, index: int, client: ActivationClient, n_batches: int) -> None:
        try:
            for _ in range(n_batches):
                self.results[index].append(next(client))
            if self.close:
                client.close()
        except BaseException as error:  # noqa: BLE001 - re-raised by join()
            self.errors.append(error)

    def alive(self) -> bool:
        return any(thread.is_alive() for thread in self.threads)

    def join(self) -> list[list[torch.Tensor]]:
        for thread in self.threads:
            thread.join(timeout=READ_TIMEOUT_S)
        if self.errors:
            raise self.errors[0]
        assert not self.alive(), "a client is still reading"
        return self.results


def wait_until(predicate, condition: str, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {condition}"
        time.sleep(0.2)


def seqs_of(client: ActivationClient) -> list[int]:
    return [batch.seq for batch in client.batches_received]


def assert_contiguous(seqs: list[int]) -> None:
    assert seqs, "no batch received"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"batches missing or repeated: {seqs}"


def spilled_files() -> list[Path]:
    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    return [p for d in session_dir.glob("ray_spilled_objects*") for p in d.rglob("*") if p.is_file()]


@pytest.mark.slow
def test_three_subscribers_share_forward_passes(server, local_models):
    stats_before = ray.get(server.stats.remote())
    clients = [
        ActivationClient(server, HOOK_A, batch_size=100, shuffle_buffer_tokens=0),
        ActivationClient(server, HOOK_A, batch_size=100, shuffle_buffer_tokens=0),
        ActivationClient(server, HOOK_B, batch_size=100, shuffle_buffer_tokens=0),
    ]
    n_batches = 80
    delivered = Readers([(client, n_batches) for client in clients]).join()
    stats = ray.get(server.stats.remote())
    for client in clients:
        client.close()

    for client, batches in zip(clients, delivered):
        assert len(batches) == n_batches
        assert all(batch.shape == (100, D_MODEL) for batch in batches)
        assert client.tokens_delivered == 100 * n_batches
        assert_contiguous(seqs_of(client))
        counts = stats["subscribers"][client.subscriber_id]
        assert counts["hookpoint"] == client.hookpoint
        # The server counts a batch as delivered once the client acknowledges it, on its next poll.
        assert counts["delivered_batches"] >= len(client.batches_received) - client.max_batches_per_poll

    received = [delivered_by_seq(client, batches) for client, batches in zip(clients, delivered)]
    common = sorted(received[0].keys() & received[1].keys())
    assert len(common) >= 20
    for seq in common:
        assert torch.equal(received[0][seq], received[1][seq]), f"subscribers of {HOOK_A} got different batch {seq}"

    samples = sorted({seq for batches in received for seq in (min(batches), max(batches))})
    reference = reference_activations(local_models(), server_config(), samples)
    for client, batches in zip(clients, received):
        for seq in (min(batches), max(batches)):
            torch.testing.assert_close(batches[seq], reference[client.hookpoint][seq])

    forward_tokens = stats["lm_forward_tokens"] - stats_before["lm_forward_tokens"]
    assert forward_tokens <= 1.2 * clients[0].tokens_delivered, (
        f"{forward_tokens} tokens ran forward for 3 subscribers that each consumed "
        f"{clients[0].tokens_delivered}: the forward passes are not shared"
    )


@pytest.mark.slow
def test_served_activations_equal_direct_forward(server, local_models):
    with ActivationClient(server, HOOK_B, batch_size=64, shuffle_buffer_tokens=0) as client:
        delivered = [next(client) for _ in range(12)]
        norm_scale = client.norm_scale
    served = delivered_by_seq(client, delivered)
    assert len(served) >= 2
    reference = reference_activations(local_models(), server_config(), list(served))[HOOK_B]
    for seq, batch in served.items():
        torch.testing.assert_close(batch, reference[seq])

    # The server estimates the scale from whole batches at the start of the stream, until
    # they hold norm_estimate_tokens served tokens.
    first = reference_activations(local_models(), server_config(), list(range(8)))[HOOK_B]
    used = []
    for seq in range(8):
        used.append(first[seq])
        if sum(batch.shape[0] for batch in used) >= server_config().norm_estimate_tokens:
            break
    mean_norm = torch.cat(used).double().norm(dim=-1).mean().item()
    assert norm_scale == pytest.approx(D_MODEL**0.5 / mean_norm, rel=1e-4)


@pytest.mark.slow
def test_estimate_batches_are_served_without_running_again(ray_session, local_models):
    config = server_config(seed=2)
    estimate = reference_activations(local_models(), config, list(range(8)))
    served_so_far = 0
    estimate_batches = 0
    while served_so_far < config.norm_estimate_tokens:
        served_so_far += estimate[HOOK_A][estimate_batches].shape[0]
        estimate_batches += 1
    assert estimate_batches >= 3

    def batch_bytes(seq: int) -> int:
        return sum(estimate[hookpoint][seq].numel() * 4 for hookpoint in config.hookpoints)

    # Room for the first two batches of the estimate only: the rest run forward again.
    config = server_config(seed=2, norm_estimate_keep_bytes=batch_bytes(0) + batch_bytes(1))
    positions = config.sequences_per_batch * config.context_size
    handle = start_server(config, max_restarts=0)
    try:
        with ActivationClient(handle, HOOK_A, batch_size=64, shuffle_buffer_tokens=0) as client:
            assert client.norm_scale == pytest.approx(
                D_MODEL**0.5 / torch.cat([estimate[HOOK_A][seq] for seq in range(estimate_batches)])
                .double().norm(dim=-1).mean().item(),
                rel=1e-4,
            )
            delivered = [next(client) for _ in range(8 * estimate_batches)]
        stats = ray.get(handle.stats.remote())
    finally:
        ray.kill(handle)

    assert stats["reused_estimate_batches"] == 2
    assert stats["norm_estimate_forward_tokens"] == (estimate_batches - 2) * positions
    assert stats["lm_forward_tokens"] == stats["next_seq"] * positions
    served = delivered_by_seq(client, delivered)
    assert set(range(estimate_batches + 1)) <= set(served)
    for seq in range(estimate_batches + 1):
        torch.testing.assert_close(served[seq], estimate[HOOK_A][seq])


@pytest.mark.slow
def test_late_subscriber_joins_stream(server, local_models):
    early = ActivationClient(server, HOOK_A, batch_size=100, shuffle_buffer_tokens=0)
    early_reader = Readers([(early, 60)], close=True)
    wait_until(lambda: len(early.batches_received) >= 6, "the early client received 6 batches")

    late = ActivationClient(server, HOOK_A, batch_size=100, shuffle_buffer_tokens=0)
    late_delivered = [next(late) for _ in range(20)]
    late.close()
    early_delivered = early_reader.join()[0]

    assert seqs_of(late)[0] >= seqs_of(early)[0] + 5, "the late client must join mid-stream"
    assert_contiguous(seqs_of(late))
    late_batches = delivered_by_seq(late, late_delivered)
    early_batches = delivered_by_seq(early, early_delivered)
    common = sorted(late_batches.keys() & early_batches.keys())
    assert common, "the late client must read batches of the same stream"
    for seq in common:
        assert torch.equal(late_batches[seq], early_batches[seq])
    first = min(late_batches)
    reference = reference_activations(local_models(), server_config(), [first])
    torch.testing.assert_close(late_batches[first], reference[HOOK_A][first])


@pytest.mark.slow
def test_object_store_bounded_and_backpressure(server):
    max_in_flight = server_config().max_batches_in_flight
    client = ActivationClient(server, HOOK_B, batch_size=200, shuffle_buffer_tokens=1000)
    samples = []
    reader = Readers([(client, 50)])
    while reader.alive():
        samples.append(ray.get(server.stats.remote()))
        time.sleep(0.05)
    reader.join()
    assert len(client.batches_received) >= 35
    # The server keeps at most max_in_flight batches, and a client the batches of one poll reply.
    assert max(s["held_batches"].get(HOOK_B, 0) for s in samples) <= max_in_flight
    live_objects = [s["live_owned_objects"] for s in samples]
    assert max(live_objects) <= max_in_flight + 2 * client.max_batches_per_poll, live_objects
    assert not spilled_files(), "objects were spilled to disk"

    # A subscriber that never polls stops the producer max_in_flight batches ahead of it.
    stalled = ray.get(server.subscribe.remote(HOOK_B))
    received_before = len(client.batches_received)
    reader = Readers([(client, 12)])

    def producer_blocked() -> bool:
        return ray.get(server.stats.remote())["next_seq"] == stalled["start_seq"] + max_in_flight

    wait_until(producer_blocked, "the producer is max_batches_in_flight batches ahead of the stalled subscriber")
    stats = ray.get(server.stats.remote())
    assert stats["held_batches"][HOOK_B] == max_in_flight
    assert stats["subscribers"][stalled["subscriber_id"]]["cursor"] == stalled["start_seq"]
    assert reader.alive(), "the reading client must wait for the stalled subscriber"
    assert seqs_of(client)[-1] < stalled["start_seq"] + max_in_flight

    assert ray.get(server.unsubscribe.remote(stalled["subscriber_id"]))
    assert len(reader.join()[0]) == 12, "the client must continue once the stalled subscriber leaves"
    assert len(client.batches_received) > received_before + max_in_flight
    client.close()


@pytest.mark.slow
def test_clients_continue_after_server_restart(ray_session, local_models):
    config = server_config(dtype="bfloat16", seed=1)
    handle = start_server(config, max_restarts=2)
    try:
        clients = [
            ActivationClient(handle, HOOK_A, batch_size=100, shuffle_buffer_tokens=0, poll_timeout_s=2),
            ActivationClient(handle, HOOK_B, batch_size=100, shuffle_buffer_tokens=0, poll_timeout_s=2),
        ]
        scales = [client.norm_scale for client in clients]
        first_incarnation = ray.get(handle.stats.remote())["incarnation"]
        # A client that has read its batches unsubscribes, as a finished trainer does, so it
        # cannot hold back the producer while the other client still reads.
        readers = Readers([(client, 60) for client in clients], close=True)
        wait_until(lambda: all(c.tokens_delivered >= 2000 for c in clients), "both clients read 2000 tokens")
        received_before_kill = [len(client.batches_received) for client in clients]
        ray.kill(handle, no_restart=False)
        results = readers.join()
        stats = ray.get(handle.stats.remote())
    finally:
        ray.kill(handle, no_restart=True)

    assert stats["incarnation"] != first_incarnation, "the server must have restarted"
    samples = {}
    for client, delivered, scale, n_before in zip(clients, results, scales, received_before_kill):
        client.close()
        assert len(delivered) == 60
        assert client.resubscriptions >= 1
        assert client.norm_scale == pytest.approx(scale, rel=1e-3)
        seqs = seqs_of(client)
        assert seqs == sorted(set(seqs)), f"batches repeated after the restart: {seqs}"
        batches = delivered_by_seq(client, delivered)
        # The first batch, the first two after the kill, and the last whole one.
        picked = [seqs[0], *seqs[n_before : n_before + 2], max(batches)]
        samples[client.hookpoint] = {seq: batches[seq] for seq in picked if seq in batches}
    reference = reference_activations(
        local_models("bfloat16"), config, sorted({seq for picked in samples.values() for seq in picked})
    )
    for hookpoint, picked in samples.items():
        assert len(picked) >= 3
        for seq, batch in picked.items():
            # The server and this process run the bfloat16 model with different thread
            # counts, so rounding differs through the blocks and a few elements differ by
            # several bfloat16 steps. Another batch would differ by about its own norm.
            expected = reference[hookpoint][seq]
            assert batch.shape == expected.shape
            relative_error = float((batch - expected).norm() / expected.norm())
            assert relative_error < 1e-2, f"batch {seq} of {hookpoint}: relative error {relative_error:.3g}"


@pytest.mark.slow
def test_unknown_hookpoint_is_rejected(server):
    with pytest.raises(ValueError, match="blocks.9.hook_resid_post"):
        ActivationClient(server, "blocks.9.hook_resid_post", batch_size=8)
