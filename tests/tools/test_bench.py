"""``kphi bench`` produces the documented report (its numbers are measurements, not test assertions)."""

from kphi.tools.bench import PHI3_SHAPES, bench_shape, format_report


def test_shape_result_has_the_documented_json_keys():
    result = bench_shape(64, 192, 4, tokens=64, repeats=1).to_dict()
    for key in ("in", "out", "groups", "dense_ms", "kphi_ms", "ideal_ratio", "ratio"):
        assert key in result
    assert (result["in"], result["out"], result["groups"]) == (64, 192, 4)
    assert result["ideal_ratio"] == 0.5
    assert result["dense_ms"] > 0 and result["kphi_ms"] > 0 and result["ratio"] > 0


def test_the_benchmarked_shapes_are_phi3_projections_at_the_report_grouping():
    assert [s[:2] for s in PHI3_SHAPES[:4]] == [(3072, 9216), (3072, 3072), (3072, 18432), (9216, 3072)]
    assert [s[2] for s in PHI3_SHAPES] == [12, 12, 12, 32, 8]  # the README's G = 12 (32 for down_proj)


def test_report_table_lists_every_shape():
    shapes = [bench_shape(32, 64, 4, tokens=32, repeats=1).to_dict()]
    report = {
        "device": "cpu", "dtype": "float32", "torch": "x", "repeats": 1, "shapes": shapes,
        "end_to_end": {
            "presets": ["a", "b"], "batch": 1, "context": 8,
            "train_tokens_per_second": {"dense": 1.0, "kphi": 2.0}, "train_speedup": 2.0,
            "generate_tokens_per_second": {"dense": 1.0, "kphi": 2.0}, "generate_speedup": 2.0,
            "peak_memory_mb": {"dense": 10.0, "kphi": 5.0},
        },
    }
    text = format_report(report)
    assert "| 32->64 | 4 |" in text and "2.00x" in text


def test_every_formulation_is_timed_and_the_per_group_loop_is_reported_as_no_graph():
    """The formulations report: each timed eagerly; compiled with fullgraph=True, the one-GEMM, two-bmm and conv1d
    formulations are one graph, the per-group loop (GEMMs written into strided out= views) is not and says so."""
    from kphi.tools.bench_formulations import _fastest, bench_formulations, format_formulations

    rows = bench_formulations(48, 96, 4, tokens=16, repeats=1, backend="aot_eager")
    by_key = {(r.formulation, r.compiled): r for r in rows}
    assert set(by_key) == {(n, c) for n in ("per-group GEMMs", "two bmm", "concatenated bmm", "grouped conv1d")
                           for c in (False, True)}
    assert all(r.ms > 0 and r.ratio_to_dense > 0 for r in rows if r != by_key[("per-group GEMMs", True)])
    failed = by_key[("per-group GEMMs", True)]
    assert failed.ms is None and failed.error
    report = {"device": "cpu", "torch": "x", "tokens": 16, "repeats": 1, "results": [r.__dict__ for r in rows],
              "fastest": _fastest(rows)}
    text = format_formulations(report)
    assert "| float32 | 48->96 | 4 |" in text and "no graph" in text and "per-group GEMMs does not compile" in text
    quickest = min((r for r in rows if r.ms is not None), key=lambda r: r.ms)
    assert report["fastest"]["float32"]["48->96"] == quickest.formulation + (" (compiled)" if quickest.compiled else "")
