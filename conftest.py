"""Helpers the specification files share: seeded inputs, tiny image folders, the command lines of
tiny runs, child processes, and a CPU stand-in for a CUDA graph (RecordedGraph). pytest loads this
file first; the test files import these names from it."""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class RecordedGraph(TorchDispatchMode):
    """A CPU stand-in for a CUDA graph (devices.GraphedStep's `capture`), with its semantics: the
    capture records every aten operation of the step with the tensors it used and made, and leaves
    nothing changed (what existed before is restored, the RNG too); a replay runs the recorded
    operations again on the same tensors, writing each result where the capture's went. Python is
    not run again, so a value the step read on the host (a float learning rate) stays the
    capture's, exactly as in a CUDA graph; a read-back during capture fails, as on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops, self.before, self.made = [], {}, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            raise RuntimeError(f"{func}: a read-back to the host inside a CUDA graph capture")
        # some kernels write into inputs their schema does not mark (batch_norm's running stats)
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor) and id(t) not in self.made | self.before.keys():
                self.before[id(t)] = (t, t.detach().clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        self.made.update(id(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return out

    @torch.no_grad()
    def replay(self):
        for func, args, kwargs, out in self.ops:
            for old, new in zip(tree_flatten(out)[0], tree_flatten(func(*args, **kwargs))[0]):
                if isinstance(old, torch.Tensor) and old is not new:
                    old.copy_(new)

    @staticmethod
    def capture(fn):
        graph, rng = RecordedGraph(), torch.get_rng_state()
        try:
            with graph:
                out = fn()
        finally:  # a failed capture changed nothing either
            with torch.no_grad():
                for t, value in graph.before.values():
                    t.copy_(value)
            torch.set_rng_state(rng)
        return out, graph.replay


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def write_image(path, size=(24, 20), mode="RGB", seed=0, fmt=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path, format=fmt)
    return path


def make_folder(root, classes=2, per_class=8, size=(24, 20), split="train"):
    for c in range(classes):
        for i in range(per_class):
            path = os.path.join(root, split, f"class{c}", f"img{i}.png")
            write_image(path, size, seed=c * 100 + i)
    return str(root)


def pretrain_argv(root, save_dir, *extra):
    return ["pretrain", "--data", root, "--arch", "resnet18", "--input-size", "16", "--epochs", "2",
            "--batch-size", "8", "--moco-k", "16", "--bn-batch", "4", "--save-dir", str(save_dir),
            "--cache-dir", os.path.join(os.path.dirname(str(save_dir)), "cache"),
            "--print-freq", "1",
            *extra]


def run_child(argv, cwd, script="train.py", **kwargs):
    """train.py (or study.py) in a child process (for real signals), with this project on its
    path."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    return subprocess.Popen([sys.executable, script, *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def same_weights(path_a, path_b):
    a, b = (torch.load(p, weights_only=True)["model"] for p in (path_a, path_b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def finished(child, timeout=240):
    """(exit status, what it printed since) of a child, once it ends."""
    out = child.communicate(timeout=timeout)[0].decode()
    return child.returncode, out


def stage_argv(command, root, tmp, save, *extra):
    return [command, "--data", root, "--input-size", "16", "--epochs", "1", "--batch-size", "8",
            "--cache-dir", str(tmp / "cache"), "--save-dir", str(tmp / save), "--print-freq", "1",
            *extra]
