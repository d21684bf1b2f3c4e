"""docs/scaling.md's recipe on a real Dask cluster (a LocalCluster of worker processes): spike detection
over the Parquet export of a directory of runs finds exactly what ``trace.spikes()`` finds."""

from __future__ import annotations

from pathlib import Path

import normtrace_analysis as na
import numpy as np
import polars as pl
import pytest
from optional import need
from tracegen import synthetic_dqn, write_trace

need("dask.dataframe")
distributed = need("distributed")
need("pandas")
from distributed_spikes import dask_spikes  # noqa: E402

EVENT_COLUMNS = ["event", "event_pass", "event_epoch", "lag_passes", "lag_epochs"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[na.Trace, Path]:
    root = tmp_path_factory.mktemp("runs")
    for i, name in enumerate(["hard", "soft", "lr[0.1]"]):
        s = synthetic_dqn(
            n_epochs=60, passes_per_epoch=50, seed=i, no_grad=i == 1, n_spikes=10, after_event=0.5
        )
        if i == 2:  # non-finite values are spikes too
            s.outputs["norm"][[500, 901]] = [np.nan, np.inf]
        write_trace(root / name, outputs=s.outputs, events=s.events, normalize=i == 1)
    trace = na.load(root / "*")
    out = root.parent / "export"
    na.to_parquet(trace, out, table="outputs")
    return trace, out


@pytest.fixture(scope="module")
def client():
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        distributed.Client(cluster) as c,
    ):
        yield c


@pytest.mark.parametrize("by", ["run", "series"])
@pytest.mark.parametrize("level", ["pass", "epoch"])
def test_a_local_cluster_finds_the_spikes_trace_spikes_finds(exported, client, by: str, level: str) -> None:
    trace, dataset = exported
    want = trace.spikes(level=level).drop(EVENT_COLUMNS)
    got = pl.from_pandas(dask_spikes(str(dataset), by=by, level=level).compute(), nan_to_null=False)
    got = got.select(want.columns).cast(want.schema).sort(want.columns[: 5 if level == "pass" else 4])
    assert want.height > (50 if level == "pass" else 5)
    floats = ["value", "baseline", "score"]
    assert got.drop(floats).equals(want.drop(floats))  # the same spikes, at the same passes
    for column in floats:  # equal to the last bit per pass; epoch means may differ in summation order
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-12)
