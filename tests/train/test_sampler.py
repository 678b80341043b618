from kdforge.train import EpochSampler


def test_order_depends_only_on_seed_and_epoch_and_is_skippable():
    a = EpochSampler(10, seed=3)
    b = EpochSampler(10, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    b.set_start(4)
    assert list(b) == full[4:]
    a.set_epoch(3)
    assert list(a) != full
    assert sorted(full) == list(range(10))


def test_shards_cover_the_dataset_once_padded_to_world_size():
    shards = [EpochSampler(10, seed=0, num_replicas=3, rank=r) for r in range(3)]
    orders = [list(s) for s in shards]
    assert all(len(o) == 4 for o in orders)
    assert set(sum(orders, [])) == set(range(10))
