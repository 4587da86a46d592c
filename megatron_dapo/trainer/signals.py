"""Stop requests: SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, torchrun's
shutdown) ask the run to checkpoint at the end of the current step and exit cleanly."""

import signal
import types

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Sets a flag in the signal handler, nothing more: the loop checks it between steps."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signal.Signals(signum)

    def requested(self) -> bool:
        """Collective: whether any rank was signalled (launchers may signal only some of the ranks), so that
        every rank saves and stops at the same step."""
        device = "cuda" if torch.cuda.is_available() else "cpu"  # NCCL reduces CUDA tensors only
        flag = torch.tensor([float(self.received is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
