"""The tailored architecture as a figure: which universal blocks and proxies a task kept, with their gates.

    from figures import plot_architecture
    plot_architecture(student.stats()).savefig('architecture.png')

main_student.py writes one per run (`<model-dir>/architecture.png`); the decathlon notebook draws one per task.
"""
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Arc, Patch, Rectangle

import utils

BLOCK_COLOUR, PROXY_COLOUR, REMOVED_COLOUR = '#1f77b4', '#d62728', '#c0c0c0'


def plot_architecture(stats, ax=None, name=None):
    """Draw `NetTailor.stats()`: nodes x0..xL on a line, universal block l as a box between x(l-1) and xl,
    proxies as arcs below the line from their source node.  Kept paths are coloured, with their gate
    written beside them (and shown as the box's shade or the arc's width); removed ones are grey.  The
    title sums up what was kept, after `name` if given.  Returns the figure, a new one unless `ax` is given."""
    num_layers = stats['universal_blocks_total']
    figure = None
    if ax is None:
        figure = Figure(figsize=(1.5 + 0.75 * num_layers, 3.0), layout='constrained')
        ax = figure.add_subplot()
    deepest = 0.0
    node_fed = [True] + [False] * num_layers
    for row in stats['layers']:
        node_fed[row['layer']] |= row['kept']
        if row['path'] == 'proxy':
            deepest = max(deepest, _proxy_arc(ax, row))
        else:
            _universal_box(ax, row)
    for node, fed in enumerate(node_fed):
        ax.plot(node, 0, 'o', markersize=7, markerfacecolor='black' if fed else 'white',
                markeredgecolor='black' if fed else REMOVED_COLOUR, zorder=4)
        ax.text(node, 0.16, f'x{node}', ha='center', va='bottom', fontsize=8)
    ax.set_xlim(-0.4, num_layers + 0.4)
    ax.set_ylim(-deepest - 0.05, 0.75)
    ax.axis('off')
    ax.legend(handles=[Patch(facecolor=BLOCK_COLOUR, label='universal block kept (gate)'),
                       Patch(facecolor='white', edgecolor=REMOVED_COLOUR, linestyle='--', label='removed'),
                       Line2D([], [], color=PROXY_COLOUR, lw=2, label='proxy kept (gate)'),
                       Line2D([], [], color=REMOVED_COLOUR, lw=1, label='proxy removed')],
              loc='upper center', ncols=4, fontsize=7, frameon=False)
    title = (f"{stats['universal_blocks_kept']}/{num_layers} universal blocks, "
             f"{stats['proxies_kept']}/{stats['proxies_total']} proxies, "
             f"{stats['flops'] / 1e9:.3g} GFLOPs ({stats['flops'] / stats['flops_full']:.0%} of the full network)")
    ax.set_title(title if name is None else f'{name}: {title}', fontsize=9)
    return figure if figure is not None else ax.figure


def _universal_box(ax, row):
    left = row['layer'] - 0.8
    if row['kept']:
        style = dict(facecolor=BLOCK_COLOUR, alpha=0.3 + 0.7 * row['gate'], edgecolor=BLOCK_COLOUR,
                     gid='universal-kept')
        ax.text(left + 0.3, 0, f"{row['gate']:.2f}", ha='center', va='center', fontsize=6, zorder=5,
                color='white' if row['gate'] > 0.5 else 'black')
    else:
        style = dict(facecolor='white', edgecolor=REMOVED_COLOUR, linestyle='--', gid='universal-removed')
    ax.add_patch(Rectangle((left, -0.14), 0.6, 0.28, zorder=3, **style))
    ax.plot([row['layer'] - 1, row['layer']], [0, 0], color='black' if row['kept'] else REMOVED_COLOUR,
            lw=0.8, zorder=2)


def _proxy_arc(ax, row):
    """The arc of one proxy (a half ellipse under the line); returns how deep it reaches."""
    span = row['layer'] - row['source']
    depth = 0.25 + 0.2 * span
    centre = (row['source'] + row['layer']) / 2
    if row['kept']:
        style = dict(color=PROXY_COLOUR, lw=0.8 + 3 * row['gate'], zorder=2, gid='proxy-kept')
        ax.text(centre, -depth - 0.02, f"{row['gate']:.2f}", ha='center', va='top', fontsize=6, color=PROXY_COLOUR)
    else:
        style = dict(color=REMOVED_COLOUR, lw=0.6, zorder=1, gid='proxy-removed')
    ax.add_patch(Arc((centre, 0), span, 2 * depth, theta1=180, theta2=360, **style))
    return depth + 0.15


def save_figure(figure, path):
    """`figure` as a PNG at `path`, written atomically."""
    with utils.writing(f'the figure {path}'):  # a full disk, say: the runs it draws are saved already
        utils.atomic_write(path, lambda tmp: figure.savefig(tmp, format='png', dpi=150), suffix='.png')


def save_architecture(stats, path):
    """The figure of `stats` as a PNG at `path`, written atomically."""
    save_figure(plot_architecture(stats), path)
