"""A patched model trains under DistributedDataParallel: 2 CPU processes with the gloo backend
give the same gradients as one process on the whole batch."""

import faulthandler
import gc
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import mhr_ops


def build_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4))
    mhr_ops.patch(model, ["0", "2"], r=2, n_skills=3, n_splits=2, n_tasks=5, train_mode="sigmoid")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("B", "logits")):
                p.normal_(0, 0.5)
    return model


def data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 12, generator=gen), torch.randint(0, 5, (8,), generator=gen)


def _train_step(rank, out_path):
    model = nn.parallel.DistributedDataParallel(build_model())
    x, ids = data()
    shard = slice(rank * 4, rank * 4 + 4)
    with mhr_ops.use_tasks(model, ids[shard]):
        model(x[shard]).square().mean().backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, out_path)


def _worker(rank, world, port, out_path):
    # A crash in a worker prints its Python stacks into the test's captured output.
    faulthandler.enable(all_threads=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _train_step(rank, out_path)
        # The DDP module holds the process group: free it (and any cycle through it) now, so that
        # the group and its gloo threads are torn down by destroy_process_group below while the
        # interpreter is fully alive, never by garbage collection during interpreter shutdown (CI
        # once saw a worker abort with "terminate called without an active exception"). The barrier
        # keeps either rank from closing its connections while the other still uses them.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gloo_two_processes_match_single_process(tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    model = build_model()
    x, ids = data()
    with mhr_ops.use_tasks(model, ids):
        model(x).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ddp_grads.keys() and any(n.endswith(".A") for n in grads)
    for name, g in grads.items():
        torch.testing.assert_close(ddp_grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
