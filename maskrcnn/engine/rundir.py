"""The run directory's policy: which files a training run writes in runs/<name>/, when a new run may start there
(never over another run's checkpoints unless --overwrite; --resume needs a checkpoint), what is deleted before it
writes, and the command that resumes it."""
from __future__ import annotations

import shlex
from pathlib import Path

from ..config import TrainConfig
from .checkpoint import LAST, NUMBERED, resume_candidates

DEFAULT_OUTPUT_DIR = TrainConfig.output_dir  # train.py --resume finds runs here without --set



def run_files(run_dir: Path) -> list[Path]:
    """The files a training run writes in its directory."""
    if not run_dir.is_dir():
        return []
    fixed = [run_dir / n for n in ("config.yaml", LAST, "model_final.pth", "metrics.json")]
    return sorted([p for p in fixed if p.exists()]
                  + [p for p in run_dir.iterdir() if NUMBERED.fullmatch(p.name)
                     or p.name.startswith("events.out.tfevents.") or p.name.endswith(".pth.tmp")])


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> list[Path]:
    """Refuse to start a new run in a directory that holds another one (a checkpoint), unless it is resumed or
    overwritten. Returns the files to delete before the new run writes: the old run's with --overwrite (its
    TensorBoard events would otherwise mix with the new ones), or those of a start that stopped before its first
    checkpoint (a directory without a checkpoint is no run: the same command starts it again)."""
    if resume and overwrite:
        raise ValueError("--resume continues a run and --overwrite starts it again: choose one")
    if resume:
        if not resume_candidates(run_dir):
            started = (run_dir / "config.yaml").is_file()
            raise FileNotFoundError(f"--resume: no checkpoint in {run_dir} to continue from ({LAST} or "
                                    "model_<iter>.pth)" + ("; its start stopped before the first checkpoint: run the "
                                                           "same command without --resume" if started else ""))
        return []
    old = run_files(run_dir)
    held = [p for p in old if p.suffix == ".pth"]
    if held and not overwrite:
        names = ", ".join(p.name for p in held[:3]) + (", ..." if len(held) > 3 else "")
        raise ValueError(f"{run_dir} already holds a run ({names}); continue it with --resume, "
                         "or start it again with --overwrite (deletes its checkpoints and events)")
    return old


def clear_run_dir(run_dir: Path, old: list[Path], overwrite: bool) -> None:
    """Delete `old` (check_run_dir's list), saying so."""
    for p in old:
        p.unlink(missing_ok=True)
    if old and overwrite:
        print(f"--overwrite: removed {len(old)} files of the previous run in {run_dir}")
    elif old:
        print(f"note: {run_dir} held a start that stopped before its first checkpoint "
              f"({', '.join(p.name for p in old)}): removed, starting again")


def resume_command(run_dir: Path, world_size: int = 1) -> str:
    launcher = f"torchrun --nproc_per_node={world_size}" if world_size > 1 else "python"
    cmd = f"{launcher} train.py --name {shlex.quote(run_dir.name)} --resume"
    if run_dir.parent != Path(DEFAULT_OUTPUT_DIR):
        cmd += f" --set train.output_dir={shlex.quote(str(run_dir.parent))}"
    return cmd
