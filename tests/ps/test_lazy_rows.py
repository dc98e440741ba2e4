"""Lazy row updates on a shard: only the rows a push touches move, and they move exactly as
optax moves those rows alone (per-row state gathered and scattered, the step count shared)."""

from __future__ import annotations

import numpy as np
import optax
from hypothesis import given, settings
from hypothesis import strategies as st

from dmlsys.ps.clock import ASP, Clock
from dmlsys.ps.partition import LeafSpec, plan
from dmlsys.ps.server import ShardJob


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), pushes=st.integers(1, 4), shards=st.integers(1, 3))
def test_touched_rows_follow_optax_on_those_rows_and_the_others_stay_put(tmp_path_factory, seed, pushes, shards):
    rows, dim = 40, 3
    pm = plan([LeafSpec("emb", (rows, dim), "<f4")], shards, tables=["emb"])
    shard = 0
    job = ShardJob("j", tmp_path_factory.mktemp("lazy"), pm, shard, Clock(["w"], ASP),
                   {"hyperparams": {"optimizer": "adam", "lr": 0.1}}, fsync=False)
    job.init_values({}, {"emb": {"scale": 1.0, "seed": seed}})
    local = pm.tables[0].local_rows(shard, shards)
    table = job.rows["emb"][:local].copy()
    # the reference: optax Adam on each row by itself, with the shard's shared step count
    opt = optax.adam(0.1)
    mu, nu = np.zeros_like(table), np.zeros_like(table)
    rng = np.random.default_rng(seed)
    for step in range(pushes):
        local_ids = np.unique(rng.integers(0, local, rng.integers(1, local + 1)))
        ids = local_ids * shards + shard
        grads = rng.standard_normal((ids.size, dim)).astype(np.float32)
        held = job.rows["emb"][:local].copy()
        job.accept({"seq": step + 1, "w": "w", "c": step, "n": 1, "g": {}, "r": {"emb": {"i": ids, "g": grads}}})
        state = optax.ScaleByAdamState(count=np.int32(step), mu=mu[local_ids], nu=nu[local_ids])
        updates, (state, _) = opt.update(grads, (state, optax.EmptyState()), table[local_ids])
        table[local_ids] = np.asarray(optax.apply_updates(table[local_ids], updates))
        mu[local_ids], nu[local_ids] = np.asarray(state.mu), np.asarray(state.nu)
        untouched = np.setdiff1d(np.arange(local), local_ids)
        np.testing.assert_array_equal(job.rows["emb"][untouched], held[untouched])
        np.testing.assert_allclose(job.rows["emb"][:local], table, rtol=1e-6, atol=1e-7)
