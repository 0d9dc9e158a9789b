"""AOT compile of the Triton kernels for sm_90 (no GPU needed): the fused log-prob forward and
backward compile at the shipped H100 block sizes, and cuobjdump reports no register spills."""

import json

import pytest

pytest.importorskip("triton")

from kernels import report as rep  # noqa: E402


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:0
 Function _fwd_kernel:
  REG:188 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert rep.parse_resource_usage(text) == {
        "_fwd_kernel": {"reg": 188, "stack": 0, "shared": 1024, "local": 0}}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    if rep.find_cuobjdump() is None:
        pytest.skip("cuobjdump not shipped with this triton")
    path = tmp_path_factory.mktemp("aot") / "report.json"
    rows = rep.report(json_path=str(path), modules=("kernels.logprob",))
    assert json.loads(path.read_text())["rows"] == rows
    return rows


def test_logprob_kernels_compile_without_spills(rows):
    from kernels import logprob

    by_name = {r["name"]: r for r in rows}
    for name in ("logprob_fwd", "logprob_bwd_dlogits", "logprob_merge", "logprob_fwd_fp32",
                 "logprob_bwd_dlogits_fp32", "logprob_merge_n1"):
        r = by_name[name]
        assert r["error"] is None, r
        assert 0 < r["reg"] <= 255, r
        assert r["stack"] == 0, f"{name} spills: {r}"
        assert r["shared_dynamic"] <= 227 * 1024, r  # H100 max dynamic SMEM per block
    # shipped block sizes are the ones compiled
    assert by_name["logprob_fwd"]["num_warps"] == logprob.CONFIGS["default"][0]["num_warps"]
    assert by_name["logprob_bwd_dlogits"]["num_stages"] == logprob.CONFIGS["default"][1]["num_stages"]
    assert by_name["logprob_fwd_fp32"]["num_stages"] == logprob.GPU_FP32_CONFIG["num_stages"]
    print("\n" + rep.format_table(rows))


def test_flat_tuning_candidates_compile_for_sm90():
    """The ":flat" configs bench/tune_logprob.py tries on a GPU (flattened tile x H loop; the
    backward's persistent programs) compile for sm_90 here (`python -m kernels.report
    --logprob-fwd/--logprob-bwd`), with at most a small spill, so a GPU session spends no time on a
    candidate that cannot build."""
    if rep.find_cuobjdump() is None:
        pytest.skip("cuobjdump not shipped with this triton")
    from bench import tune_logprob

    fwd = tuple(c for c in tune_logprob.FWD.split(";") if c.endswith(":flat"))
    bwd = tuple(c for c in tune_logprob.BWD.split(";") if c.endswith(":flat"))
    rows = rep.report(fwd=fwd, bwd=bwd)
    assert [r["name"] for r in rows] == [f"logprob_fwd[{c}]" for c in fwd] + [f"logprob_bwd_dlogits[{c}]" for c in bwd]
    assert len(rows) == 3
    for r in rows:
        assert r["error"] is None, r
        assert 0 < r["reg"] <= 255 and r["stack"] <= 128 and r["shared_dynamic"] <= 227 * 1024, r
    assert rows[-1]["num_stages"] == 2  # the configs' own launch options reach the compiler
    print("\n" + rep.format_table(rows))
