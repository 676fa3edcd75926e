"""Work done once, on rank 0, while the other ranks wait: its error reaches every rank."""

from __future__ import annotations

from ..errors import InputError, UserError


def distributed():
    """torch.distributed when a process group is up, else None."""
    try:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist
    except ImportError:
        pass
    return None


def on_rank0(work, what: str) -> None:
    """Runs work() on rank 0 while the other ranks wait (over the default group). An error
    there is sent to every rank and raised on each: a peer left waiting in a collective would
    hang for the collective's timeout under srun or mpirun (only torchrun kills it)."""
    dist = distributed()
    if dist is None:
        work()
        return
    rank0, failure = dist.get_rank() == 0, None
    if rank0:
        try:
            work()
        except Exception as exc:   # sent on, then raised here as it is (with its traceback)
            failure = exc
    sent = [None if failure is None else (type(failure), str(failure))]
    dist.broadcast_object_list(sent, src=0)
    if failure is not None:
        raise failure
    if sent[0] is not None:
        cls, message = sent[0]
        if issubclass(cls, UserError):
            try:
                error = cls(message)
            except TypeError:
                error = InputError(message)
            raise error from None
        raise RuntimeError(f"rank 0 failed while {what}: {cls.__name__}: {message} (its traceback is in its output)")
