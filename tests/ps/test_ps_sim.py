"""Parameter-server jobs on the simulated network (random delays, reordering links, slow and
stalled workers, crashed shards): what BSP, SSP and ASP promise, and that an acknowledged
update is never lost."""

from __future__ import annotations

import asyncio
import random

import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.ps.clock import ASP, BSP, Consistency, ssp
from dmlsys.ps.errors import PsError
from dmlsys.wire.sim import Link
from tests.ps.helpers import each, run_ps

SGD1 = {"hyperparams": {"optimizer": "sgd", "lr": 1.0}}
REORDERING = Link(delay=0.001, jitter=0.01)


# -- BSP: N workers compute what one worker computes on the global batch -----------------------


def linear_problem(seed: int, steps: int, batch: int, rows: int):
    rng = np.random.default_rng(seed)
    params = {"w": (rng.standard_normal((24, 5)) * 0.1).astype(np.float32),
              "b": np.zeros(5, np.float32), "emb": np.zeros((rows, 5), np.float32)}
    data = [(rng.standard_normal((batch, 24)).astype(np.float32), rng.standard_normal((batch, 5)).astype(np.float32),
             rng.integers(0, rows, batch)) for _ in range(steps)]
    return params, data


def gradient_sums(w, b, emb_rows, x, y):
    """0.5 * |x w + b + emb[id] - y|^2 summed over the batch: gradients w.r.t. w, b, the rows."""
    r = x @ w + b + emb_rows - y
    return x.T @ r, r.sum(0), r


def reference(params, data, optimizer: str):
    """One worker, whole global batches, plain optax on the whole tree."""
    opt = optax.sgd(0.05) if optimizer == "sgd" else optax.adam(0.01)
    p = {k: np.asarray(v) for k, v in params.items()}
    trained = ["w", "b", "emb"] if optimizer == "sgd" else ["w", "b"]  # Adam on a table is lazy on the shards
    state = opt.init({k: p[k] for k in trained})
    for x, y, ids in data:
        gw, gb, gr = gradient_sums(p["w"], p["b"], p["emb"][ids], x, y)
        gemb = np.zeros_like(p["emb"])
        np.add.at(gemb, ids, gr)
        grads = {"w": gw / len(x), "b": gb / len(x), "emb": gemb / len(x)}
        sub = {k: p[k] for k in trained}
        updates, state = opt.update({k: grads[k] for k in trained}, state, sub)
        p.update({k: np.asarray(v) for k, v in optax.apply_updates(sub, updates).items()})
    return p


@settings(max_examples=12, deadline=None)
@given(workers=st.integers(1, 4), shards=st.integers(1, 3), optimizer=st.sampled_from(["sgd", "adam"]),
       seed=st.integers(0, 2**16))
def test_bsp_with_n_workers_gives_the_parameters_of_one_worker_on_the_global_batches(workers, shards, optimizer, seed):
    steps, batch, rows = 5, 12, 40
    params, data = linear_problem(seed, steps, batch, rows)
    if optimizer == "adam":  # the reference runs Adam on the dense leaves only
        want = reference({k: v for k, v in params.items()}, data, optimizer)
    else:
        want = reference(params, data, optimizer)
    hp = {"optimizer": optimizer, "lr": 0.05 if optimizer == "sgd" else 0.01}
    tables = ["emb"] if optimizer == "sgd" else []
    rng = random.Random(seed)

    async def body(c):
        clients = [c.client(i) for i in range(workers)]
        init = params if tables else {k: v for k, v in params.items() if k != "emb"}
        await asyncio.gather(*(cl.open(init, workers=c.worker_names, tables=tables, consistency=BSP,
                                       optimizer={"hyperparams": hp}) for cl in clients))

        async def work(rank):
            cl = clients[rank]
            for t, (x, y, ids) in enumerate(data):
                lo, hi = rank * batch // workers, (rank + 1) * batch // workers
                x, y, ids = x[lo:hi], y[lo:hi], ids[lo:hi]
                pulled = await cl.pull(t, rows={"emb": ids} if tables else None)
                emb_rows = pulled.rows["emb"] if tables else params["emb"][ids]
                gw, gb, gr = gradient_sums(pulled.values["w"], pulled.values["b"], emb_rows, x, y)
                await asyncio.sleep(rng.random() * 0.02)  # compute takes a while, differently each time
                await cl.push(t, {"w": gw, "b": gb}, rows={"emb": (ids, gr)} if tables else None, n=hi - lo)
            return await cl.pull(len(data), rows={"emb": np.arange(rows)} if tables else None)

        return await each([lambda r=r: work(r) for r in range(workers)])

    results = run_ps(shards, workers, body, seed=seed, link=REORDERING)
    for got in results:
        assert not isinstance(got, BaseException), got
        np.testing.assert_allclose(got.values["w"], want["w"], rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(got.values["b"], want["b"], rtol=2e-4, atol=2e-5)
        if tables:
            np.testing.assert_allclose(got.rows["emb"], want["emb"], rtol=2e-4, atol=2e-5)


# -- staleness, seen through the parameters themselves ------------------------------------------
#
# The "marker" model: one parameter cell per (step, worker); worker w's push of step t adds exactly
# 1 to cell (t, w) (SGD, lr 1, gradient -1 over n = 1; under BSP the shard divides a step's sum by
# the step's total n = workers, so the gradient is -workers there). A pull shows which updates are in.


def marker_params(steps: int, workers: int):
    return {"seen": np.zeros((steps, workers), np.float32), "pad": np.zeros(64, np.float32)}


def marker_grad(steps: int, workers: int, t: int, w: int, bsp: bool = False):
    g = np.zeros((steps, workers), np.float32)
    g[t, w] = -float(workers) if bsp else -1.0
    return {"seen": g, "pad": np.zeros(64, np.float32)}


async def marker_worker(cl, rank, steps, workers, delays, log, stall_after=None, bsp=False):
    """Worker ``rank``'s loop; returns what it reads at clock ``steps`` (under SSP or ASP that may
    still lack the slower workers' last steps)."""
    for t in range(steps):
        if stall_after is not None and t >= stall_after:
            await asyncio.sleep(1e6)  # stalled: alive, silent
        pulled = await cl.pull(t)
        log.append((rank, t, pulled.values["seen"].copy()))
        await asyncio.sleep(delays(rank))
        await cl.push(t, marker_grad(steps, workers, t, rank, bsp), n=1)
    return (await cl.pull(steps)).values["seen"]


@settings(max_examples=15, deadline=None)
@given(consistency=st.sampled_from([BSP, ssp(1), ssp(2), ssp(3), ASP]), workers=st.integers(2, 4),
       shards=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_no_worker_computes_on_parameters_older_than_s_clocks(consistency, workers, shards, seed):
    steps = 10
    rng = random.Random(seed)
    log: list = []

    def delays(rank):  # worker 0 is three times slower than the rest
        return rng.random() * (0.03 if rank == 0 else 0.01)

    async def body(c):
        clients = [c.client(i) for i in range(workers)]
        await asyncio.gather(*(cl.open(marker_params(steps, workers), workers=c.worker_names,
                                       consistency=consistency, optimizer=SGD1) for cl in clients))
        done = await each([lambda r=r: marker_worker(clients[r], r, steps, workers, delays, log,
                                                      bsp=consistency.aggregates) for r in range(workers)])
        return done, (await clients[0].pull(steps)).values["seen"]

    done, final = run_ps(shards, workers, body, seed=seed, link=REORDERING)
    for result in done:
        assert not isinstance(result, BaseException), result
    assert np.array_equal(final, np.ones((steps, workers)))  # every update in, none twice
    s = consistency.bound
    for rank, c, seen in log:
        assert seen.max() <= 1
        assert np.all(seen[:c, rank] == 1), f"worker {rank} at clock {c} misses its own writes"
        if s is not None:
            assert np.all(seen[:max(0, c - s)] == 1), f"worker {rank} read at clock {c} with staleness > {s}"
        if consistency == BSP:
            assert np.array_equal(seen[:c], np.ones((c, workers))) and not seen[c:].any()


def test_asp_makes_progress_with_a_stalled_worker_where_bsp_and_ssp_wait():
    steps, workers = 8, 3

    def run(consistency: Consistency):
        log: list = []

        async def body(c):
            clients = [c.client(i) for i in range(workers)]
            await asyncio.gather(*(cl.open(marker_params(steps, workers), workers=c.worker_names,
                                           consistency=consistency, optimizer=SGD1) for cl in clients))
            tasks = [asyncio.ensure_future(marker_worker(clients[r], r, steps, workers, lambda r: 0.01, log,
                                                         stall_after=2 if r == 2 else None))
                     for r in range(workers)]
            done, _ = await asyncio.wait(tasks[:2], timeout=60.0)  # virtual seconds
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return len(done)

        return run_ps(1, workers, body, drop_timeout=3600.0)

    assert run(ASP) == 2  # both healthy workers finished every step
    assert run(BSP) == 0
    assert run(ssp(2)) == 0


def test_a_dead_worker_is_dropped_after_the_timeout_and_bsp_goes_on():
    steps, workers = 6, 3

    async def body(c):
        clients = [c.client(i) for i in range(workers)]
        await asyncio.gather(*(cl.open(marker_params(steps, workers), workers=c.worker_names,
                                       consistency=BSP, optimizer=SGD1) for cl in clients))
        log: list = []

        async def dies(cl):
            for t in range(2):
                await cl.pull(t)
                await cl.push(t, marker_grad(steps, workers, t, 2, bsp=True), n=1)
            c.crash_worker(2)

        results = await each([lambda r=r: marker_worker(clients[r], r, steps, workers, lambda r: 0.01, log, bsp=True)
                              for r in range(2)] + [lambda: dies(clients[2])])
        return results, await clients[0].info(0)

    results, info = run_ps(2, workers, body, drop_timeout=5.0)
    for final in results[:2]:
        assert not isinstance(final, BaseException), final
        # (after the drop a step's sum is divided by 2 samples, not 3: the cells hold 1.5)
        assert np.all(final[:, :2] >= 1) and np.all(final[:2, 2] == 1) and not final[2:, 2].any()
    assert info["dropped"] == {"w2": 2}


# -- faults: a crashed shard never loses an acknowledged update ---------------------------------


@settings(max_examples=15, deadline=None)
@given(consistency=st.sampled_from([BSP, ssp(1), ASP]), shards=st.integers(1, 3), seed=st.integers(0, 2**16),
       kills=st.lists(st.tuples(st.floats(0.0, 0.4), st.integers(0, 2), st.floats(0.0, 0.3)), min_size=1, max_size=3),
       checkpoint_every=st.sampled_from([1, 3, 1000]))
def test_killing_a_shard_at_any_moment_never_loses_an_acknowledged_update(consistency, shards, seed, kills,
                                                                          checkpoint_every):
    steps, workers = 8, 3
    acked: list[tuple[int, int]] = []
    rng = random.Random(seed)

    async def body(c):
        clients = [c.client(i, call_timeout=0.5, deadline=60.0) for i in range(workers)]
        await asyncio.gather(*(cl.open(marker_params(steps, workers), workers=c.worker_names,
                                       consistency=consistency, optimizer=SGD1) for cl in clients))

        async def work(rank):
            cl = clients[rank]
            for t in range(steps):
                await cl.pull(t)
                await asyncio.sleep(rng.random() * 0.02)
                await cl.push(t, marker_grad(steps, workers, t, rank, consistency.aggregates), n=1)
                acked.append((t, rank))

        async def killer():
            for at, shard, down_for in kills:
                await asyncio.sleep(at)
                c.crash(shard % shards)
                await asyncio.sleep(down_for)
                await c.restart(shard % shards)

        results = await each([lambda r=r: work(r) for r in range(workers)] + [killer])
        for result in results:
            assert not isinstance(result, BaseException), result
        infos = [await clients[0].info(i) for i in range(shards)]
        return (await clients[0].pull(steps)).values["seen"], infos

    final, infos = run_ps(shards, workers, body, seed=seed, link=REORDERING, checkpoint_every=checkpoint_every,
                            drop_timeout=3600.0)
    assert len(acked) == steps * workers
    for t, rank in acked:
        assert final[t, rank] == 1, f"acked update (step {t}, worker {rank}) is missing"
    assert final.max() <= 1, "an update was applied twice"
    for info in infos:
        assert info["applied_pushes"] == steps * workers


def test_a_push_with_the_wrong_shape_is_refused_naming_the_slice():
    async def body(c):
        cl = c.client(0)
        await cl.open({"w": np.zeros((4, 3), np.float32)}, workers=["w0"], optimizer=SGD1)
        with pytest.raises(PsError, match=r"gradient of 'w' must be float32\(4, 3\), got float64\(4, 3\)"):
            await cl.push(0, {"w": np.zeros((4, 3))}, n=1)

    run_ps(1, 1, body)


def test_a_second_open_with_another_map_is_refused():
    async def body(c):
        await c.client(0).open({"w": np.zeros((4, 3), np.float32)}, workers=["w0"], optimizer=SGD1)
        with pytest.raises(PsError, match="use another job name"):
            await c.client(0).open({"w": np.zeros((5, 3), np.float32)}, workers=["w0"], optimizer=SGD1)

    run_ps(1, 1, body)


def test_a_push_that_skips_a_step_is_refused_and_does_not_break_recovery():
    async def body(c):
        cl = c.client(0)
        await cl.open({"w": np.zeros((4, 3), np.float32)}, workers=["w0"], optimizer=SGD1)
        with pytest.raises(PsError, match="pushed step 2 .* steps up to -1 only"):
            await cl.push(2, {"w": np.ones((4, 3), np.float32)}, n=1)
        await cl.push(0, {"w": np.ones((4, 3), np.float32)}, n=1)
        c.crash(0)
        await c.restart(0)
        return (await cl.pull(1)).values["w"]

    np.testing.assert_array_equal(run_ps(1, 1, body), -np.ones((4, 3)))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), kill_at=st.floats(0.0, 0.15), checkpoint_every=st.sampled_from([1, 2, 5]))
def test_a_shard_recovered_from_checkpoint_and_log_ends_in_the_state_of_one_never_killed(seed, kill_at,
                                                                                         checkpoint_every):
    """Adam on dense leaves and (lazily) on a table, BSP with pending sums: the restarted shard
    holds bit for bit what an uninterrupted one holds (two workers: sums in any order are exact)."""
    steps, batch, rows, workers = 5, 8, 30, 2
    params, data = linear_problem(seed, steps, batch, rows)
    hp = {"hyperparams": {"optimizer": "adam", "lr": 0.01}}

    def run(kill: bool):
        async def body(c):
            clients = [c.client(i, call_timeout=0.5) for i in range(workers)]
            await asyncio.gather(*(cl.open(params, workers=c.worker_names, tables=["emb"], optimizer=hp,
                                           table_init={"emb": {"scale": 0.1, "seed": 1}}) for cl in clients))

            async def work(rank):
                cl = clients[rank]
                for t, (x, y, ids) in enumerate(data):
                    lo, hi = rank * batch // workers, (rank + 1) * batch // workers
                    pulled = await cl.pull(t, rows={"emb": ids[lo:hi]})
                    gw, gb, gr = gradient_sums(pulled.values["w"], pulled.values["b"], pulled.rows["emb"],
                                               x[lo:hi], y[lo:hi])
                    await asyncio.sleep(0.01 * (rank + 1))
                    await cl.push(t, {"w": gw, "b": gb}, rows={"emb": (ids[lo:hi], gr)}, n=hi - lo)

            async def killer():
                await asyncio.sleep(kill_at)
                c.crash(0)
                await asyncio.sleep(0.05)
                await c.restart(0)

            done = await each([lambda r=r: work(r) for r in range(workers)] + ([killer] if kill else []))
            assert all(d is None for d in done), done
            return await clients[0].pull(steps, rows={"emb": np.arange(rows)})

        return run_ps(2, workers, body, seed=seed, checkpoint_every=checkpoint_every)

    calm, killed = run(False), run(True)
    for path in ("w", "b"):
        assert killed.values[path].tobytes() == calm.values[path].tobytes(), path
    assert killed.rows["emb"].tobytes() == calm.rows["emb"].tobytes()


def test_a_step_is_one_pull_and_one_push_message_per_shard():
    shards, steps = 3, 4

    async def body(c):
        cl = c.client(0)
        params = {"a": np.zeros((300, 8), np.float32), "b": np.zeros(8, np.float32), "c": np.zeros((40, 3), np.float32)}
        await cl.open(params, workers=["w0"], optimizer=SGD1)
        assert {s.shard for s in cl.map.slices} == set(range(shards))
        before = c.worker_nodes[0].metrics.messages_out
        for t in range(steps):
            pulled = await cl.pull(t)
            await cl.push(t, {k: np.ones_like(v) for k, v in pulled.values.items()}, n=1)
        return c.worker_nodes[0].metrics.messages_out - before, cl.retries

    sent, retries = run_ps(shards, 1, body, link=Link(delay=0.001, jitter=0.0))
    assert retries == 0 and sent == steps * 2 * shards


# -- a push that carries the next step's pull ----------------------------------------------------


@pytest.mark.parametrize("consistency", [BSP, ssp(1)])
def test_a_push_with_then_pull_returns_what_a_pull_of_the_next_step_returns(consistency):
    steps, workers = 4, 2

    async def body(c):
        clients = [c.client(i) for i in range(workers)]
        await asyncio.gather(*(cl.open(marker_params(steps, workers), workers=c.worker_names,
                                       consistency=consistency, optimizer=SGD1)
                               for cl in clients))
        bsp = consistency.aggregates

        async def work(rank):
            fused, pulled = [], []
            for t in range(steps):
                got = await clients[rank].push(t, marker_grad(steps, workers, t, rank, bsp), n=1, then_pull=True)
                fused.append(got.values["seen"].copy())
                pulled.append((await clients[rank].pull(t + 1)).values["seen"])
            return fused, pulled

        return await each([lambda r=r: work(r) for r in range(workers)])

    for got in run_ps(2, workers, body, link=REORDERING):
        assert not isinstance(got, BaseException), got
        fused, pulled = got
        for t, (f, p) in enumerate(zip(fused, pulled, strict=True)):
            if consistency.aggregates:
                np.testing.assert_array_equal(f, p)  # BSP: exactly steps < t + 1, either way
                assert f[: t + 1].sum() == workers * (t + 1) and f[t + 1:].sum() == 0
            else:
                assert (f <= p).all() and f[: max(0, t + 1 - consistency.staleness)].all()
