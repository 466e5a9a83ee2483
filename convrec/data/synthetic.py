"""A built-in synthetic dataset: deterministic by seed, learnable, with long histories on demand.

Items have a category attribute and one or two style attributes, Zipf popularity, and a few
successors that share an attribute with them. Users prefer some categories. Each next item is
a successor of the previous one (the sequential signal), an item from a preferred category
(the user signal) or a popular item (the popularity signal), so sequence models can beat a
popularity ranking, and attributes help for items seen rarely.
"""

from __future__ import annotations

import numpy as np

from convrec.data.dataset import Event, SequenceDataset, build_dataset


def synthetic_dataset(
    num_users: int = 2000,
    num_items: int = 600,
    num_categories: int = 12,
    num_styles: int = 20,
    mean_length: float = 20.0,
    max_length: int = 200,
    follow: float = 0.6,
    preferred: float = 0.25,
    seed: int = 0,
) -> SequenceDataset:
    """Generate users' histories; lengths are log-normal around ``mean_length``, in [5, max_length].

    ``follow`` and ``preferred`` are the probabilities of the sequential and user signals; the
    rest of the time the next item is drawn by popularity.
    """
    if num_items < 10 or num_users < 1 or max_length < 5:
        raise ValueError("synthetic_dataset needs num_items >= 10, num_users >= 1, max_length >= 5")
    rng = np.random.default_rng(seed)
    category = rng.integers(0, num_categories, num_items)
    popularity = 1.0 / np.arange(1, num_items + 1) ** 1.0
    popularity = popularity[rng.permutation(num_items)]
    popularity /= popularity.sum()
    styles = [rng.choice(num_styles, rng.integers(1, 3), replace=False) for _ in range(num_items)]
    by_category = [np.flatnonzero(category == c) for c in range(num_categories)]
    successors = []
    for i in range(num_items):
        pool = by_category[category[i]]
        pool = pool[pool != i] if len(pool) > 1 else np.arange(num_items)
        weights = popularity[pool] / popularity[pool].sum()
        successors.append(rng.choice(pool, min(3, len(pool)), replace=False, p=weights))

    events = []
    lengths = np.clip(rng.lognormal(np.log(mean_length), 0.6, num_users), 5, max_length).astype(int)
    start_days = rng.integers(16000, 18000, num_users)  # days since 1970
    for user, length in enumerate(lengths):
        likes = rng.dirichlet(np.full(num_categories, 0.3))
        item = int(rng.choice(num_items, p=popularity))
        day = float(start_days[user])
        for position in range(length):
            events.append(Event(str(user + 1), str(item + 1), int(day * 86400), position))
            day += rng.exponential(3.0) if rng.random() < 0.7 else 0.0
            draw = rng.random()
            if draw < follow:
                item = int(rng.choice(successors[item]))
            elif draw < follow + preferred:
                pool = by_category[int(rng.choice(num_categories, p=likes))]
                if len(pool) == 0:
                    pool = np.arange(num_items)
                item = int(rng.choice(pool, p=popularity[pool] / popularity[pool].sum()))
            else:
                item = int(rng.choice(num_items, p=popularity))
    attributes = {
        str(i + 1): [f"category={category[i]}"] + [f"style={s}" for s in styles[i]]
        for i in range(num_items)
    }
    data = build_dataset("synthetic", events, attributes, "synthetic", presorted=True)
    data.source.update(
        format="synthetic",
        path="synthetic",
        options=dict(
            num_users=num_users,
            num_items=num_items,
            num_categories=num_categories,
            num_styles=num_styles,
            mean_length=mean_length,
            max_length=max_length,
            follow=follow,
            preferred=preferred,
            seed=seed,
        ),
    )
    return data
