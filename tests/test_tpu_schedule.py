"""The TPU performance model's readers (sasa_flax.tools.tpu_schedule, tpu_model) on texts whose cost is
known by hand: libtpu's program format and compiled HLO, as libtpu 0.0.42.1 writes them."""

# ruff: noqa: E501  (HLO and libtpu lines are long)
from __future__ import annotations

from sasa_flax.tools import tpu_model, tpu_schedule

# A kernel program: 2 bundles before the grid loop; the grid loop (10 iterations, bundles
# 2 to 7, closed by the branch back to its region) holds an inner loop of 2 bundles run 4
# times, whose exit test comes before its last bundle (as libtpu pipelines them).
PROGRAM = """= control target key start
LB: loop body
= control target key end

     0   :  { %s1 = smov 0 }
   0x1   :  { %s2 = smov 0 }
   0x2 LB: > { %s3 = sadd.s32 1, %s2 } /* Start region 9 :: Start region 3 */
   0x3 LB: > { %v1 = vadd.f32 %v2, %v3  ;;  %p1 = scmp.ge.s32.totalorder %s4, 4 /* loop exit test */ } /* Start region 5 */
   0x4   : > { %v5 = vadd.f32 %v1, %v1  ;;  %7 = sbr.rel (!%p1) target = $region5 }
   0x5   : > { %v4 = vmul.f32 %v1, %v1 }
   0x6   : > { %p2 = scmp.ge.s32.totalorder (%p1), %s3, 10 /* loop exit test */  ;;  %s5 = smov %s3 }
   0x7   :  { %16 = sbr.rel (!%p2) target = $region9 }
"""


def test_kernel_cycles_weigh_each_bundle_by_the_loops_around_it():
    cycles, bundles, loops = tpu_schedule.kernel_cycles(PROGRAM)
    assert bundles == 8
    # outside: 0, 1 -> 2; grid only: 2, 5, 6, 7 -> 4 x 10; inner: 3, 4 -> 2 x 4 x 10
    assert cycles == 2 + 4 * 10 + 2 * 4 * 10
    assert loops == (10, 4)


HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %f.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_a, metadata={op_name="jit(step)/group1_block2/local_attention/transpose"}, backend_config={"estimated_cycles":"100"}
  %k.1 = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/sasa_local_attention_fwd_tpu/pallas_call"}, backend_config={"custom_call_config":{"body":"AAA","cost_estimate":{"bytes_accessed":"0"}}}
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %c = pred[] constant(true)
}

ENTRY %main () -> f32[] {
  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %f.2 = f32[8]{0} fusion(%y), kind=kOutput, calls=%fused_b, metadata={op_name="jit(step)/stem/conv_general_dilated"}, backend_config={"estimated_cycles":"7"}
  %k.2 = f32[8]{0} custom-call(%x), custom_call_target="tpu_custom_call", metadata={op_name="jit(step)/sasa_local_attention_fwd_tpu/pallas_call"}, backend_config={"custom_call_config":{"body":"AAA","cost_estimate":{"bytes_accessed":"0"}}}
  %ar = f32[8]{0} all-reduce(%f.2), replica_groups={}, to_apply=%add
}
"""


def test_instructions_count_loop_bodies_per_iteration_and_match_kernels_by_body(tmp_path):
    # libtpu dumps one program, named after the first call; the second call has its body.
    (tmp_path / "1-sasa_k.1-03-final_bundles.txt").write_text(PROGRAM)
    hlo = HLO.replace("%k.1 =", "%sasa_k.1 =").replace("%k.2 =", "%sasa_k.2 =")
    estimate = tpu_model.read(hlo, tmp_path, generation="v5e", program="t", images_per_device=1)
    by_name = {i.name: i for i in estimate.instructions}
    assert by_name["f.1"].times == 3 and by_name["f.2"].times == 1
    assert estimate.missing_kernels == 0
    kernel = 2 + 40 + 80
    assert estimate.cycles == 100 * 3 + 7 + kernel * 3 + kernel
    kinds = estimate.by(tpu_model.kind_of)
    assert kinds["layout glue"] == 300 and kinds["convolutions"] == 7
    assert kinds["attention kernels"] == 4 * kernel
    assert estimate.by(tpu_model.layer_of)["group1_block2"] == 300
    assert estimate.summary()["collectives"] == {"all-reduce": 1}


def test_a_loop_without_a_known_trip_count_counts_the_bound_of_its_condition(tmp_path):
    """XLA leaves no known_trip_count on some loops (``lax.map`` over the attention stem's
    strips): the bound of the condition's ``counter < N`` counts its body N times; a
    condition of another form, once."""
    condition = """%cond (p: (s32[], f32[8])) -> pred[] {
  %constant.9 = s32[]{:T(128)} constant(8)
  %gte = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte, %constant.9), direction=LT
}"""
    hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
    counted = tpu_model.read(
        hlo.replace(
            "%cond (p: (s32[], f32[8])) -> pred[] {\n  %c = pred[] constant(true)\n}", condition
        ),
        tmp_path,
        generation="v5e",
        program="t",
        images_per_device=1,
    )
    assert {i.name: i.times for i in counted.instructions}["f.1"] == 8
    unknown = tpu_model.read(hlo, tmp_path, generation="v5e", program="t", images_per_device=1)
    assert {i.name: i.times for i in unknown.instructions}["f.1"] == 1


def test_a_kernel_bound_by_memory_counts_its_traffic_at_the_chips_bandwidth(tmp_path):
    (tmp_path / "1-sasa_k.1-03-final_bundles.txt").write_text(PROGRAM)
    hlo = HLO.replace("%k.1 =", "%sasa_k.1 =").replace("%k.2 =", "%sasa_k.2 =")
    # 819 MB at v5e's 819 GB/s is 1 ms: 1.5 M cycles, far above the schedule's 122.
    hlo = hlo.replace('"bytes_accessed":"0"', '"bytes_accessed":"819000000"')
    estimate = tpu_model.read(hlo, tmp_path, generation="v5e", program="t", images_per_device=1)
    kernel = next(i for i in estimate.instructions if i.kind == "kernel")
    assert abs(estimate.kernel_cycles(kernel) - 1.5e6) < 10
