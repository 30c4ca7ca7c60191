"""A mutation check of the orchestration: each named mutant must fail a test.

`make mutate` (or `python tests/mutants.py [--only WORD] [--quick]`) copies code/ to a
temporary folder once per mutant, applies one small bug there, and runs the tests that
should catch it with that copy first on PYTHONPATH. A mutant that passes its tests
"survives" and the script exits with 1. The mutants are bugs the test suite once missed
(issue 15) plus the data-loss guards of the run folder. `--quick` skips the torchrun
mutants (a minute or two each on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAIN, GEN, CKPT = "train.py", "generate.py", "checkpoint.py"
RUNFOLDER, CHECKS = "runfolder.py", "checks.py"
TORCHRUN = (
    "tests/test_train.py::test_two_processes_under_torchrun_log_the_losses_of_one"
)


@dataclass(frozen=True)
class Mutant:
    """One bug: in code/buildllm/`module`, `old` (found exactly once) becomes `new`."""

    name: str
    module: str
    old: str
    new: str
    tests: tuple[str, ...]
    slow: bool = False


MUTANTS = [
    Mutant("gradient sync on the first micro-step", TRAIN,
           "enabled=micro == accum_local - 1", "enabled=micro == 0",
           (TORCHRUN + "_process[ddp]",), slow=True),
    Mutant("loss divided by the global accumulation count", TRAIN,
           "(loss / accum_local).backward()", "(loss / self.config.grad_accum_steps).backward()",
           (TORCHRUN + "_process[ddp]",), slow=True),
    Mutant("random states not restored on resume", TRAIN,
           '        set_rng_states(state["rng"])\n', "",
           (("tests/test_train.py::test_resume_restores_the_random_state_so_dropout_masks_"
            "match_the_full_run"),)),
    Mutant("finished rows do not repeat their stop token", GEN,
           "next_token = torch.where(done, new_tokens[-1], next_token)", "pass",
           (("tests/test_generate.py::test_a_finished_row_repeats_its_stop_token_and_"
            "batches_cut_completions_there"),)),
    Mutant("generate_batch does not cut at the stop token", GEN,
           "completions[i] = new[:cut]", "completions[i] = new",
           (("tests/test_generate.py::test_a_finished_row_repeats_its_stop_token_and_"
            "batches_cut_completions_there"),)),
    Mutant("checkpoint pruning disabled", CKPT,
           "for old in find_checkpoints(out_dir)[:-keep]:",
           "for old in find_checkpoints(out_dir)[:0]:",
           (("tests/test_runfolder.py::test_pruning_keeps_exactly_the_newest_checkpoints_"
            "and_latest_names_the_last"),)),
    Mutant("top-p keeps a token whose predecessors hold exactly p", GEN,
           "drop_sorted = mass_before >= top_p", "drop_sorted = mass_before > top_p",
           (("tests/test_generate.py::test_top_p_keeps_only_the_likeliest_token_when_it_"
            "alone_holds_exactly_p"),)),
    Mutant("a bad latest pointer hides the checkpoints", CKPT,
           "    found = find_checkpoints(out_dir)\n    return found[-1] if found else None",
           "    return None",
           (("tests/test_runfolder.py::test_a_missing_or_stale_latest_pointer_still_finds_"
            "the_newest_checkpoint"),)),
    Mutant("a fresh run may write over another run's files", RUNFOLDER,
           "    if found and not resume:", "    if False:",
           (("tests/test_runfolder.py::test_a_fresh_run_never_writes_over_metrics_of_a_run_"
            "without_checkpoints"),)),
    Mutant("no lock on the run folder", RUNFOLDER,
           "fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)", "pass",
           (("tests/test_runfolder.py::test_a_second_trainer_is_locked_out_of_a_folder_in_"
            "use"),)),
    Mutant("an interrupted checkpoint write leaves its folder", CKPT,
           "        shutil.rmtree(tmp, ignore_errors=True)\n        if is_disk_full",
           "        if is_disk_full",
           (("tests/test_runfolder.py::test_ctrl_c_inside_a_checkpoint_write_leaves_no_"
            "partial_folder"),)),
    Mutant("NaN passes a range check", CHECKS,
           "        if not math.isfinite(x):\n            return False\n", "",
           ("tests/test_errors.py",)),
    Mutant("a torn metrics line blocks the run", CKPT,
           "            if number == len(lines):  # no newline after it: torn by a kill\n"
           "                break\n", "",
           (("tests/test_runfolder.py::test_a_torn_last_metrics_line_is_skipped_and_"
            "dropped_on_resume"),)),
    Mutant("the KV cache returns float32 under bf16 autocast", "attention.py",
           "if k_all.dtype != k.dtype:", "if False:",
           (("tests/test_attention.py::test_a_float32_kv_cache_returns_keys_and_values_"
            "in_the_dtype_of_the_new_ones"),)),
    Mutant("restore leaves torch's rebuilt param_groups (betas a list)", CKPT,
           "zip(optimizer.param_groups, saved_groups, strict=True)", "zip([], [])",
           (("tests/test_train.py::test_restore_gives_back_the_saved_param_groups_"
            "exactly_types_included"),)),
    Mutant("a query a mask leaves no key gets NaN on the manual path", "attention.py",
           "attn_weights = attn_weights.masked_fill(~allowed, 0.0)", "pass",
           (("tests/test_attention.py::test_any_boolean_mask_gives_sdpa_with_the_same_"
            "mask_on_both_paths"),)),
    Mutant("encode ranks a merge by the id it forms, not its position", "tokenizer.py",
           "self._ranks = merge_ranks(self.vocab, self.merges)",
           "self._ranks = {t: self._ids.get(t, -1) for t in merge_ranks(self.vocab, "
           "self.merges)}",
           (("tests/test_vocab_io.py::test_ids_in_another_order_than_the_merges_encode_"
            "as_the_original"),)),
    Mutant("a whole .part file is fetched forever (HTTP 416)", "data.py",
           "if err.code == 416:", "if False:",
           (("tests/test_cli.py::test_data_download_caches_a_corpus_and_keeps_a_part_"
            "file_that_is_already_whole"),)),
    Mutant("a --tokenizer other than the data's is taken", "distributed.py",
           "if given is not None and given.hash != found.hash:", "if False:",
           (("tests/test_own_model.py::test_a_tokenizer_that_is_not_the_data_or_run_"
             "tokenizer_is_refused_in_one_line[train]"),)),
    Mutant("the model's vocabulary ignores the data's tokenizer", "datasources.py",
           'if "vocab_size" not in overrides:', "if False:",
           (("tests/test_own_model.py::test_data_prepare_then_train_follows_the_data_"
             "tokenizer_and_exports"),)),
]  # fmt: skip


def run_mutant(mutant: Mutant) -> tuple[bool, float]:
    """Apply `mutant` to a copy of code/ and run its tests; return (killed, seconds)."""
    with tempfile.TemporaryDirectory(prefix="mutant-") as tmp:
        code = Path(tmp) / "code"
        shutil.copytree(
            ROOT / "code", code, ignore=shutil.ignore_patterns("__pycache__")
        )
        path = code / "buildllm" / mutant.module
        text = path.read_text()
        if text.count(mutant.old) != 1:
            raise SystemExit(f"mutant {mutant.name!r}: its text is not in {path.name} "
                             "exactly once; update tests/mutants.py")  # fmt: skip
        path.write_text(text.replace(mutant.old, mutant.new))
        env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                   *mutant.tests]  # fmt: skip
        start = time.perf_counter()
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, check=False
        )
        return result.returncode != 0, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    """Run the mutants; print one line each; exit 1 if any survives."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutants whose name holds this word")
    parser.add_argument("--quick", action="store_true", help="skip torchrun mutants")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if (args.only or "") in m.name]
    chosen = [m for m in chosen if not (args.quick and m.slow)]
    survivors = []
    for mutant in chosen:
        killed, seconds = run_mutant(mutant)
        print(f"{'killed ' if killed else 'SURVIVED'} {seconds:6.1f} s  {mutant.name}")
        if not killed:
            survivors.append(mutant.name)
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
