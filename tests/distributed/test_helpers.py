"""kdforge.distributed: launch-size detection, the process-group check, wrapper detection."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from kdforge.distributed import (
    WORLD_SIZE_VARS,
    check_process_group,
    launched_world_size,
    needs_cpu_process_group,
    wrapper_of,
)
from kdforge.errors import DeviceError


@pytest.fixture
def clean_env(monkeypatch):
    for var in WORLD_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_world_size_is_one_when_not_launched_and_read_from_torchrun_or_mpi_variables(clean_env):
    assert launched_world_size() == 1
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    assert launched_world_size() == 4
    clean_env.setenv("WORLD_SIZE", "2")  # torchrun/accelerate's variable wins
    assert launched_world_size() == 2


def test_cpu_process_group_is_needed_only_for_several_processes_without_cuda(clean_env):
    assert not needs_cpu_process_group()
    clean_env.setenv("WORLD_SIZE", "2")
    assert needs_cpu_process_group() is (not torch.cuda.is_available())


def test_two_launched_processes_that_each_see_one_raise_device_error_with_the_fix(clean_env):
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(DeviceError) as err:
        check_process_group(SimpleNamespace(num_processes=1))
    assert "2 processes were launched" in str(err.value) and "ACCELERATE_USE_CPU=1" in err.value.fix
    check_process_group(SimpleNamespace(num_processes=2))  # a real group passes


def test_single_process_run_passes_the_group_check(clean_env):
    check_process_group(SimpleNamespace(num_processes=1))


def test_wrapper_of_finds_a_data_parallel_wrapper_anywhere_in_the_module_tree():
    class DistributedDataParallel(nn.Module):  # stands in for torch's (same class name)
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    plain = nn.Sequential(nn.Linear(2, 2))
    assert wrapper_of(plain) is None
    assert wrapper_of(DistributedDataParallel(plain)) == "DistributedDataParallel"
    assert wrapper_of(nn.Sequential(nn.DataParallel(nn.Linear(2, 2)))) == "DataParallel"


def test_wrapper_of_sees_fsdp2_which_renames_the_class_of_the_module_it_shards():
    from torch import nn

    from kdforge.distributed import wrapper_of

    class FSDPModule:  # stands in for torch.distributed.fsdp.FSDPModule (matched by name)
        pass

    # fully_shard swaps the module's class for a new subclass named FSDP<Original>
    sharded = nn.Sequential(nn.Linear(2, 2))
    sharded[0].__class__ = type("FSDPLinear", (FSDPModule, nn.Linear), {})
    assert wrapper_of(sharded) == "FSDPModule"
    assert wrapper_of(nn.Sequential(nn.Linear(2, 2))) is None


def test_broadcast_from_main_outside_a_process_group_returns_the_object_itself():
    from kdforge.distributed import broadcast_from_main

    obj = {"finished": True}
    assert broadcast_from_main(obj) is obj
