"""The tailored-architecture figure draws exactly what `NetTailor.stats()` says was kept."""
import errno
import os

import pytest
from matplotlib.figure import Figure

from figures import plot_architecture, save_architecture
from utils import UserError
from test_models import randomize_task_state, tiny_student


def drawn(figure, gid):
    return [patch for ax in figure.axes for patch in ax.patches if patch.get_gid() == gid]


def test_figure_draws_kept_and_removed_paths_as_stats_says(tmp_path):
    student = tiny_student()
    randomize_task_state(student)
    student.prune(num_universal=3, proxy_threshold=0.15)
    stats = student.stats()
    figure = plot_architecture(stats)
    assert len(drawn(figure, 'universal-kept')) == stats['universal_blocks_kept'] == 5
    assert len(drawn(figure, 'universal-removed')) == 3
    assert len(drawn(figure, 'proxy-kept')) == stats['proxies_kept'] > 0
    assert len(drawn(figure, 'proxy-removed')) == stats['proxies_total'] - stats['proxies_kept'] > 0
    # kept universal blocks sit between the nodes they join; kept proxies' arcs span source -> target node
    kept_blocks = sorted(row['layer'] for row in stats['layers'] if row['path'] == 'universal' and row['kept'])
    centres = [box.get_x() + box.get_width() / 2 for box in drawn(figure, 'universal-kept')]
    assert sorted(round(centre + 0.5) for centre in centres) == kept_blocks
    kept = [row for row in stats['layers'] if row['path'] == 'proxy' and row['kept']]
    spans = sorted((round(arc.center[0] - arc.width / 2), round(arc.center[0] + arc.width / 2))
                   for arc in drawn(figure, 'proxy-kept'))
    assert spans == sorted((row['source'], row['layer']) for row in kept)
    labels = [text.get_text() for text in figure.axes[0].texts]
    assert all(f"{row['gate']:.2f}" in labels for row in kept)
    assert f"5/8 universal blocks, {stats['proxies_kept']}/21 proxies" in figure.axes[0].get_title()

    path = tmp_path / 'run' / 'architecture.png'
    save_architecture(stats, str(path))
    assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert [p.name for p in path.parent.iterdir()] == ['architecture.png']  # no temporary file left behind


def test_a_figure_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A full disk: a traceback once the student's run was saved; the figure is not half-written."""
    def full_disk(figure, path, **options):
        open(path, 'wb').write(b'half')
        raise OSError(errno.ENOSPC, 'No space left on device')
    monkeypatch.setattr(Figure, 'savefig', full_disk)
    with pytest.raises(UserError, match=f"^cannot write the figure {tmp_path}/architecture.png: No space left on "
                                        "device$"):
        save_architecture(tiny_student().stats(), tmp_path / 'architecture.png')
    assert os.listdir(tmp_path) == []
