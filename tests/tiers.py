"""The two tiers of the test suite, in one place.

`pytest` runs the quick tier, `pytest --full` every test (what CI runs: .ci/run).  A test
function not named in RULES runs whole in both tiers.  A function named here keeps, in the
quick tier, a *cover* of its parametrizations: cases chosen (preferred values first, then
collection order) until every value of each argument in `cover` -- and of `backend`, always:
both engines stay in the quick tier wherever a test takes one -- has run at least once.  An
argument outside the cover runs its preferred value (else its first).  FULL(why) leaves a
function to the full tier alone.

Picking by argument and value, never by spelled-out ids, keeps the registry in charge: an
optimizer added to fusedopt/spec.py lands in test_parity's cover (argument `name`) and in
every function not named here, so it runs in the quick tier without an edit to this file.
AdamW is the preferred optimizer wherever one case stands for all: the trimmed tests then
share its compiled kernel variants instead of each compiling another optimizer's (the cost
of the first run is mostly numba compiling variants: ~1 s each, an 8-bit one far more).
"""
import collections

import torch

ALWAYS = ("backend",)
PREFER = dict(name="AdamW", dtype=torch.float32)


class Rule(collections.namedtuple("Rule", "cover prefer why")):
    """cover: the arguments each of whose values the quick tier runs at least once;
    prefer: argument -> value tried first (on top of PREFER); why: the reason."""


def rule(why, cover=(), **prefer):
    return Rule(tuple(cover), prefer, why)


def FULL(why):
    return Rule(None, {}, why)


ONE = "one case stands for the function's other cases; each compiles its own kernel variant"

RULES = {
    # -- parity: one case per optimizer (its first flag set, float32: Numba and Triton both),
    # and each other dtype once
    "test_parity.py::test_parity": rule(
        "the matrix is 140 cases of ~5-120 s each; every optimizer's first case on both "
        "engines and each dtype once stay quick", cover=("name", "dtype")),
    # -- 8-bit state
    "test_8bit.py::test_one_step_matches_float64_reference": rule(
        "60-190 s per optimizer on a first run (an 8-bit variant each); AdamW stands for all"),
    "test_8bit.py::test_engines_write_equal_codes": rule(ONE),
    "test_8bit.py::test_bfloat16_params_with_8bit_state": rule(ONE),
    "test_8bit.py::test_training_loss_within_one_percent_of_float32": FULL(
        "a training run (~65 s); the one-step reference and the engines' codes stay quick"),
    "test_release.py::test_every_optimizer_is_bitwise_the_normal_step": FULL(
        "each optimizer's own flag-rich variant; five optimizers on both engines stay quick "
        "in test_released_params_are_bitwise_the_normal_steps"),
    "test_release.py::test_8bit_state_bitwise": FULL(
        "compiles its own 8-bit variant (60-190 s on a first run); gradient release with "
        "float and mixed-precision state stays quick"),
    "test_8bit.py::test_tiny_and_subnormal_blocks": FULL(
        "~90 s of compiling its own variant; the blocks' codes are checked by test_quant"),
    # -- 4-bit state: AdamW's reference step and both engines' equal codes stay quick
    "test_4bit.py::test_one_step_matches_float64_reference": rule(
        "a 4-bit variant per optimizer (~40 s each on a first run); AdamW stands for all"),
    "test_4bit.py::test_engines_write_equal_codes": rule(ONE),
    "test_4bit.py::test_every_code_and_midpoint_of_both_maps": FULL(
        "compiles SGD's and Adagrad's 4-bit variants (~100 s); AdamW's codes are checked "
        "against the reference and across engines in the quick tier"),
    "test_4bit.py::test_digits_training_loss_near_float32": FULL(
        "a training run (~40 s with a first compile); the one-step reference stays quick"),
    "test_4bit.py::test_digits_bound_catches_a_wrong_map": FULL(
        "a training run per mutant (~25 s each): the mutation check of the test above"),
    # -- AMP: GradScaler's unscale in the kernel, both engines, both dtypes, AdamW
    "test_amp.py::test_unscale_in_kernel": rule(
        "52 cases, up to 200 s each (Adafactor); one optimizer per engine and dtype",
        cover=("dtype",)),
    # -- aliasing: every way a grad can meet written memory, on one optimizer
    "test_aliasing.py::test_a_grad_that_meets_memory_the_step_writes_gives_torchs_result": rule(
        "91 cases; every kind of meeting on AdamW", cover=("how",)),
    "test_aliasing.py::test_state_tensors_a_user_holds_stay_the_state_across_plan_rebuilds": rule(
        ONE + " (Adafactor's alone took 75 s)"),
    "test_aliasing.py::test_state_sharing_memory_or_not_a_tensor_gives_torchs_result_or_error":
        rule("42 cases; every kind of sharing on one optimizer", cover=("how",)),
    # -- mixed precision and clipping: every engine, dtype and option on AdamW
    "test_precision.py::test_float32_state": rule(ONE, cover=("dtype",)),
    "test_precision.py::test_master_weights": rule(ONE, cover=("dtype",)),
    "test_kahan.py::test_every_algorithm_follows_the_float32_replay": rule(
        "14 optimizers, ~5-15 s each on a first run (a Kahan variant each); AdamW stands "
        "for all, the Kahan sum itself is one code path for every rule"),
    "test_kahan.py::test_dtypes_and_state_follow_the_float32_replay": rule(
        ONE, cover=("dtype", "state_dtype")),
    "test_remainder.py::test_200_steps_bit_for_bit_master_weights": rule(
        "200 interpreted Triton steps per optimizer (18-43 s) and a variant each on Numba; "
        "Adam (three slots) stands for SGD and LAMB", name="Adam"),
    "test_remainder.py::test_8bit_state": FULL(
        "compiles its own 8-bit Numba variant (~50 s on a first run)"),
    "test_kahan.py::test_8bit_state_follows_the_float32_replay": FULL(
        "an 8-bit Kahan variant compiles for 60-115 s on Numba; the other Kahan tests stay "
        "quick on both engines"),
    "test_clip.py::test_max_grad_norm": rule(ONE, cover=("amp",)),
    "test_clip.py::test_matches_torch": rule("36 cases of one kernel", cover=("order", "dtype")),
    "test_integration.py::test_capturable_parity": rule(ONE, cover=("dtype",)),
    "test_integration.py::test_compile_fullgraph_no_recompile": rule(ONE, cover=("lr_kind",)),
    "test_integration.py::test_scheduler": rule(
        "every scheduler class on one optimizer", cover=("kind",)),
    "test_host.py::test_grad_of_the_same_width_but_another_dtype_gives_torchs_outcome": rule(ONE),
    "test_behaviour.py::test_l1_matches_reference": rule(ONE),
    # -- Adafactor, arith, quant: the costly mutation and dispatch runs
    "test_adafactor.py::test_looser_ulp_bound_catches_mutants": FULL(
        "a mutant's run is 20-160 s; test_arith's 1-ulp mutation keeps the criteria's check quick"),
    "test_adafactor.py::test_reduction_pass_sums": rule(ONE),
    "test_adafactor.py::test_second_pass_sums_the_updates_squares": rule(ONE),
    "test_arith.py::test_parity_subset_under_other_dispatch": FULL(
        "a parity subset under other ATen dispatch in a subprocess: 50-70 s each"),
    "test_arith.py::test_parity_check_catches_a_1ulp_error_in_our_kernels": rule(
        "a mutated kernel each (~30-80 s); one mutation stays quick"),
    "test_quant.py::test_each_cpu_path_gives_the_portable_codes": FULL(
        "~45 s per CPU kind compiling the 8-bit kernel; test_vector_codes_equal_the_loop "
        "checks each path's codes"),
    # -- safety: one heap-checked program run stays quick
    "test_safety.py::test_these_tests_under_heap_checking": FULL(
        "reruns test files under heap checking in a subprocess (~70 s)"),
    "test_safety.py::test_random_programs_under_heap_checking": rule(
        "the 60 programs with the facts read in Python stay quick (every other test reads "
        "them natively); the 200 native ones run in --full", reader="python"),
    # -- distributed: each scenario once
    "test_distributed.py::test_matches_torch_optim": rule(ONE),
    "test_distributed.py::test_clipping_by_the_global_norm": rule(ONE),
    "test_distributed.py::test_8bit_state_under_fsdp2": FULL(
        "FSDP2 8-bit training and a DCP save (~150 s); 8-bit state and FSDP2 stay quick apart"),
    "test_distributed.py::test_8bit_checkpoint_reshard": FULL(
        "reshards the FSDP2 8-bit checkpoint (the fixture above)"),
    "test_distributed.py::test_checkpoint_resume_and_reshard": FULL(
        "DCP save, load and reshard (~120 s); test_dist_programs' programs save and load "
        "DCP checkpoints under FSDP2 in the quick tier"),
    "test_distributed.py::test_clipping_without_the_all_reduce_fails": FULL(
        "the norm all-reduce mutation; test_dist_programs runs the same mutation quick"),
    "test_distributed.py::test_trust_ratios_from_the_shards_norms_are_caught": FULL(
        "the trust ratios' shard-norm mutation (~30 s, a process group of its own); "
        "test_trust_ratios_under_fsdp2 runs the scenario quick"),
    # -- Muon: its bf16 Newton-Schulz is slow on a CPU; each value once stays quick
    "test_muon.py::test_fused_passes_are_torchs_bit_for_bit": rule(
        "16 cases of ~5-30 s (torch's bfloat16 matmuls, three trainings each)",
        cover=("hp", "dtype")),
    # -- AOT PTX: one rule per check keeps each kind of variant (arch, amp, 8-bit, masters/SR)
    "test_aot.py::test_compiles_with_vector_loads": rule(
        "52 PTX compiles; each arch and amp on one rule", cover=("arch", "amp")),
    "test_aot.py::test_8bit_state_compiles": rule(ONE, cover=("arch",)),
    "test_aot.py::test_4bit_state_compiles": rule(ONE, cover=("arch",)),
    "test_aot.py::test_mixed_precision_compiles": rule(ONE, cover=("sr",)),
    # -- the trust-ratio algorithms against their packages: 28 cases of ~5-60 s (the
    # interpreted Triton engine over 65537 elements, 20 steps); the first case on both
    # engines stays quick, and test_parity's quick tier runs each one's first case on both
    "test_trust.py::test_steps_as_the_package": rule(
        "28 cases of 5-60 s; one case on both engines stands for them (test_parity covers "
        "LAMB, LARS and StableAdamW on both engines in the quick tier too)"),
}


def function_key(nodeid):
    """'tests/test_x.py::test_f[case]' -> 'test_x.py::test_f' (the key of RULES)."""
    return nodeid.split("[", 1)[0].rpartition("tests/")[2]


def _matches(value, wanted):
    # equality only between plain values of one type: a tensor or a dtype against a str
    # would raise or compare by identity
    return type(value) is type(wanted) and value == wanted


def _token(callspec, arg):
    # a plain value stands for itself; another (a dict, a case object) for its place in its
    # list.  Not the place alone: arguments parametrized together ("name,case,dtype") share
    # one index per row, which would make every row a new name
    v = callspec.params[arg]
    if v is None or isinstance(v, (str, int, float, bool, torch.dtype)):
        return repr(v)
    return callspec.indices[arg]


def quick(items, rule):
    """The items (one function's, in collection order) of the quick tier under ``rule``."""
    if rule.cover is None:
        return []
    cover = set(rule.cover) | set(ALWAYS)
    prefer = dict(PREFER, **rule.prefer)

    def score(item):
        params = item.callspec.params
        return -sum(_matches(params[k], v) for k, v in prefer.items() if k in params)

    keep, seen = [], set()
    for item in sorted(items, key=score):  # sorted() is stable: collection order breaks ties
        tokens = {(k, _token(item.callspec, k)) for k in cover if k in item.callspec.params}
        if not keep or tokens - seen:
            keep.append(item)
            seen |= tokens
    return keep


def split(items):
    """(quick, full_only): the collected items divided by RULES, each list in collection order."""
    groups = collections.defaultdict(list)
    for item in items:
        groups[function_key(item.nodeid)].append(item)
    kept = set()
    for key, group in groups.items():
        r = RULES.get(key)
        if r is None or not all(hasattr(i, "callspec") for i in group):
            kept.update(map(id, group) if r is None or r.cover is not None else ())
        else:
            kept.update(map(id, quick(group, r)))
    return [i for i in items if id(i) in kept], [i for i in items if id(i) not in kept]
