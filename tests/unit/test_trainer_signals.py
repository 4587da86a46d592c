"""SIGUSR1 and SIGTERM only raise a flag, which every rank reads at the end of a step."""

import os
import signal

import pytest
import torch.distributed as dist

from megatron_dapo.rollout.launcher import free_port
from megatron_dapo.trainer.signals import StopRequest


@pytest.fixture(scope="module")
def world():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_sets_the_flag_and_the_process_lives_on(world, sig):
    before = signal.getsignal(sig)
    stop = StopRequest()
    try:
        assert not stop.requested()
        os.kill(os.getpid(), sig)  # delivered before kill returns, to this (main) thread
        assert stop.received == sig
        assert stop.requested()
    finally:
        stop.close()
    assert signal.getsignal(sig) is before
