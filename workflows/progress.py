"""Waiting for a job's Dask tasks the way every long job does: a progress bar, the first error raised,
Ctrl-C cancelling what is left."""
from __future__ import annotations

import sys


def wait_all(futures: list, desc: str, progress: bool = True) -> None:
    """Wait for every future, with a tqdm bar on stderr (``desc``, one step per future). A task's error
    is raised as soon as it arrives; KeyboardInterrupt cancels the remaining tasks, then propagates."""
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=len(futures), desc=desc, unit="part", disable=not progress, file=sys.stderr) as bar:
        try:
            for f in as_completed(futures):
                f.result()
                bar.update(1)
        except KeyboardInterrupt:
            if futures:
                futures[0].client.cancel(futures)
            raise
