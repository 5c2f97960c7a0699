"""A DataLoader whose forked workers call the Rust kernels must finish, not hang."""

import multiprocessing

import mmot
import torch


class SinkhornDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        scores = torch.randn(64, 16, generator=torch.Generator().manual_seed(index))
        return mmot.multi_sinkhorn(scores, 4).sum(-1)


def test_dataloader_workers_after_parent_used_the_pool():
    mmot.multi_sinkhorn(torch.randn(256, 32), 8)  # start the parent's thread pool first
    loader = torch.utils.data.DataLoader(
        SinkhornDataset(), batch_size=2, num_workers=2, multiprocessing_context=multiprocessing.get_context("fork"), timeout=60
    )
    rows = torch.cat(list(loader))
    assert rows.shape == (4, 64) and bool(torch.isfinite(rows).all())
