"""The one rule that chooses how draws are batched, and the vmap way of batching them."""

import pytest
import torch

from pyro_nf.batching import BATCHINGS, Batching, choose_batching, vmap_draws


def test_first_way_that_works_is_kept_and_the_others_are_not_run():
    tried = []

    def probe(way):
        tried.append(way)
        if way is Batching.PLATE:
            raise ValueError("shape mismatch")
        return 7

    assert choose_batching(probe) == (Batching.VMAP, 7)
    assert tried == [Batching.PLATE, Batching.VMAP]


def test_last_ways_error_propagates_unchanged():
    class ModelBug(Exception):
        pass

    def probe(way):
        raise ModelBug(way.value)

    with pytest.raises(ModelBug, match="loop"):
        choose_batching(probe)


def test_ways_in_the_given_order_and_none_refused():
    assert choose_batching(lambda way: way, ways=(Batching.LOOP,)) == (Batching.LOOP,) * 2
    assert BATCHINGS == (Batching.PLATE, Batching.VMAP, Batching.LOOP)
    with pytest.raises(ValueError, match="at least one way"):
        choose_batching(lambda way: way, ways=())


def test_vmap_draws_gives_each_draw_its_own_randomness():
    torch.manual_seed(0)
    draws = vmap_draws(lambda _: {"x": torch.randn(2), "i": torch.tensor(1.0)}, 6)
    assert draws["x"].shape == (6, 2) and draws["i"].shape == (6,)
    assert len(set(draws["x"][:, 0].tolist())) == 6  # not one draw repeated
