"""PFQ indicator against a hand-computed loss sequence, precision/LR schedules, resume of both."""

from __future__ import annotations

import json
import math

import pytest

from fracgraph.errors import FracgraphError
from fracgraph.train import schedules as S

# Epoch losses designed by hand (eps 0.05, alpha 0.3; the arithmetic is in the comments):
#  e1..e8  2.0 1.5 1.2 1.1 1.08 1.06 1.05 1.04
#     e7: scale 8.99/7 = 1.2843, window 1.2..1.05 -> .15/1.2843 = .117 > .05, no
#     e8: scale 10.03/8 = 1.25375, window 1.1..1.04 -> .06/1.25375 = .0479 <= .05 (would fail with scale 1) -> TP1
#         threshold .05 * .3 = .015, window reset
#  e9..e14 1.0 .99 .985 .98 .978 .977
#     scale frozen after e10 at 12.02/10 = 1.202
#     e13: window 1.0..0.978 -> .022/1.202 = .0183 > .015, no (first chance: 5 epochs after the reset)
#     e14: window .99...977 -> .013/1.202 = .0108 <= .015 -> TP2, threshold .0045
#  e15..e19 .97 .969 .968 .9675 .967 -> .003/1.202 = .0025 <= .0045 -> TP3 at e19; threshold stays .0045
#  e20..e24 .960 .959 .958 .957 .956 -> .004/1.202 = .00333: <= .0045 but > .0045*.3 -> TP4 at e24 only if alpha
#         is NOT applied on the 3rd turning point (needs num_turning_point=4)
LOSSES = [2.0, 1.5, 1.2, 1.1, 1.08, 1.06, 1.05, 1.04,
          1.0, .99, .985, .98, .978, .977,
          .97, .969, .968, .9675, .967,
          .960, .959, .958, .957, .956,
          .5, .5, .5, .5, .5, .5]


def test_indicator_hand_computed():
    ind = S.PFQIndicator(0.05, 0.3, num_turning_point=3)
    hits = [e for e, loss in enumerate(LOSSES, 1) if ind.update(loss)]
    assert hits == [8, 14, 19]  # stop after 3 even though e24 and the flat .5s would qualify
    assert ind.threshold == pytest.approx(0.05 * 0.3 * 0.3)
    assert ind.scale_loss == pytest.approx(12.02 / 10)
    assert ind.done and ind.loss == []  # stopped: no more losses collected


def test_indicator_alpha_only_on_first_two_and_scale_freeze():
    ind = S.PFQIndicator(0.05, 0.3, num_turning_point=4)
    thresholds, hits = [], []
    for e, loss in enumerate(LOSSES, 1):
        if ind.update(loss):
            hits.append(e)
            thresholds.append(ind.threshold)
        if e == 10:
            assert ind.scale_loss == pytest.approx(1.202)
    assert hits == [8, 14, 19, 24]
    assert thresholds == pytest.approx([0.015, 0.0045, 0.0045, 0.0045])
    assert ind.scale_loss == pytest.approx(1.202) and ind.epoch == len(LOSSES)


def test_indicator_minimum_five_epochs_per_stage():
    ind = S.PFQIndicator(0.05, 0.3, num_turning_point=3)
    hits = [e for e in range(1, 30) if ind.update(1.0)]  # perfectly flat: switch as soon as the window is full
    assert hits == [5, 10, 15]
    with pytest.raises(FracgraphError, match="train loss is nan: training diverged"):
        S.PFQIndicator().update(float("nan"))


def _feed(sched, losses, per_epoch, start=0):
    ends = []
    for e, loss in enumerate(losses):
        for k in range(per_epoch):
            step = start + e * per_epoch + k
            assert sched.bits(step) == sched.current()
            end = sched.observe(step, loss)
            if end is not None:
                ends.append(end)
    return ends


def test_pfq_schedule_transitions_logged(caplog):
    caplog.set_level("INFO", logger="fracgraph.train")
    sched = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=3, eps=0.05, alpha=0.3)
    ends = _feed(sched, LOSSES, 3)
    assert [e.epoch for e in ends] == list(range(1, len(LOSSES) + 1))
    assert [e.loss for e in ends] == pytest.approx(LOSSES)
    ts = sched.transitions
    assert [(t.step, t.epoch, t.old, t.new) for t in ts] == [
        (24, 8, (3, 6), (4, 6)), (42, 14, (4, 6), (6, 8)), (57, 19, (6, 8), (8, 8))]
    assert ts[0].losses == pytest.approx([1.1, 1.08, 1.06, 1.05, 1.04])
    assert ts[0].diffs == pytest.approx([.06 / 1.25375, .04 / 1.25375, .02 / 1.25375, .01 / 1.25375])
    assert ts[1].threshold == pytest.approx(0.015) and ts[1].scale_loss == pytest.approx(1.202)
    # new bits from the next iteration on; history answered for past steps
    assert [sched.bits(s) for s in (0, 23, 24, 41, 42, 56, 57, 10**6)] == [
        (3, 6), (3, 6), (4, 6), (4, 6), (6, 8), (6, 8), (8, 8), (8, 8)]
    logged = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(logged) == 3 and "from iteration 24" in logged[0] and "1.0400" in logged[0]


def test_pfq_epoch_loss_is_mean_of_iterations():
    sched = S.PFQSchedule([4, 8], [8, 8], epoch_iters=2, num_turning_point=1)
    per_step = [3.0, 1.0] * 4 + [2.1, 1.9]  # epoch means 2, 2, 2, 2, 2 -> flat -> switch at epoch 5
    ends = [sched.observe(i, v) for i, v in enumerate(per_step)]
    assert [e.loss for e in ends if e] == pytest.approx([2.0] * 5)
    assert ends[-1].transition is not None and ends[-1].transition.step == 10


@pytest.mark.parametrize("cut", [1, 23, 24, 25, 40, 58])
def test_pfq_resume_mid_epoch_identical(cut):
    per_step = [LOSSES[i // 3] + 0.01 * ((i * 7) % 3 - 1) for i in range(3 * len(LOSSES))]
    full = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=3)
    for i, v in enumerate(per_step):
        full.observe(i, v)
    a = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=3)
    for i, v in enumerate(per_step[:cut]):
        a.observe(i, v)
    state = json.loads(json.dumps(a.state_dict()))
    b = S.schedule_from_state(state)
    assert b.bits(cut) == a.bits(cut)
    for i, v in enumerate(per_step[cut:], cut):
        b.observe(i, v)
    assert b.state_dict() == full.state_dict()
    with pytest.raises(FracgraphError, match=f"expected {len(per_step)}"):
        b.observe(3, 1.0)
    other = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=3, eps=0.15)
    with pytest.raises(FracgraphError, match="checkpoint has eps=0.05 but this run has 0.15"):
        other.load_state_dict(state)


def test_static_and_iteration_schedules():
    st = S.StaticSchedule(8, 8, epoch_iters=2)
    assert all(st.observe(i, 1.0) is None or st.current() == (8, 8) for i in range(20)) and not st.transitions
    it = S.IterationSchedule([3, 4, 6, 8], [6, 6, 8, 8], [5, 9, 12], epoch_iters=4)
    for i in range(20):
        it.observe(i, 1.0)
    assert [(t.step, t.new) for t in it.transitions] == [(5, (4, 6)), (9, (6, 8)), (12, (8, 8))]
    assert [it.bits(s) for s in (4, 5, 8, 9, 11, 12)] == [(3, 6), (4, 6), (4, 6), (6, 8), (6, 8), (8, 8)]
    again = S.schedule_from_state(json.loads(json.dumps(it.state_dict())))
    assert again.state_dict() == it.state_dict()


def test_schedule_validation():
    with pytest.raises(FracgraphError, match="3 switches need 4 precisions"):
        S.PFQSchedule([3, 4, 6], [6, 6, 8], num_turning_point=3)
    with pytest.raises(FracgraphError, match="same length"):
        S.PFQSchedule([3, 4], [6])
    with pytest.raises(FracgraphError, match="not an integer number of bits"):
        S.StaticSchedule(40, 8)
    with pytest.raises(FracgraphError, match="epoch-iters"):
        S.StaticSchedule(8, 8, epoch_iters=0)


def test_lr_step_piecewise_cosine():
    lr = S.LRSchedule("step", 0.1, 64000)
    assert lr.milestones == [32000, 48000]
    assert [lr(s) for s in (0, 31999, 32000, 47999, 48000, 63999)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    pw = S.LRSchedule("piecewise", 0.2, 100, milestones=[10, 20, 30], gamma=0.5, warmup_iters=3, warmup_lr=0.01)
    assert [pw(s) for s in (0, 2, 3, 10, 25, 99)] == pytest.approx([0.01, 0.01, 0.2, 0.1, 0.05, 0.025])
    cos = S.LRSchedule("cosine", 0.1, 1000)
    assert cos(0) == pytest.approx(0.1) and cos(1000) == pytest.approx(0.001)
    assert cos(500) == pytest.approx(0.001 + 0.5 * 0.099)
    assert cos(250) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.cos(math.pi / 4)))
    assert all(cos(s) >= cos(s + 1) for s in range(999))
    assert S.LRSchedule("constant", 0.05, 10)(9) == 0.05
    S.LRSchedule("step", 0.1, 64000).load_state_dict(json.loads(json.dumps(lr.state_dict())))
    with pytest.raises(FracgraphError, match="total_iters=64000 but this run has 1000"):
        S.LRSchedule("step", 0.1, 1000).load_state_dict(lr.state_dict())
    with pytest.raises(FracgraphError, match="unknown"):
        S.LRSchedule("linear")
    with pytest.raises(FracgraphError, match="strictly increasing"):
        S.LRSchedule("piecewise", milestones=[5, 5])


def test_pfq_noise_floor_fires_where_the_authors_threshold_cannot():
    """A flat, noisy loss: eps*alpha^2 (0.0045 of the loss scale) sits far below the epoch mean's noise, so the
    authors' indicator never makes its third switch; with the floor at 2 standard errors it does, and at 0 the
    floor changes nothing (the authors' behaviour, step for step)."""
    import numpy as np

    rng = np.random.default_rng(0)
    losses = 1.0 + rng.normal(0, 0.1, 40 * 40)        # per-step noise 0.1: an epoch mean of 40 has 0.016
    runs = {}
    for floor in (0.0, 2.0):
        sched = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=40, noise_floor=floor)
        for i, v in enumerate(losses):
            sched.observe(i, float(v))
        runs[floor] = [t.step for t in sched.transitions]
    assert len(runs[0.0]) < 3 and len(runs[2.0]) == 3
    # the floor is max(threshold, 2 * noise / scale): the first switch (eps 0.05 >> noise) is the same in both
    assert runs[0.0][0] == runs[2.0][0]
    # and the floor never lowers a threshold: a noiseless flat loss switches at the same steps either way
    steps = {}
    for floor in (0.0, 2.0):
        sched = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=40, noise_floor=floor)
        for i in range(40 * 30):
            sched.observe(i, 1.0)
        steps[floor] = [t.step for t in sched.transitions]
    assert steps[0.0] == steps[2.0] == [200, 400, 600]


def test_pfq_noise_floor_resumes_and_refuses_a_mismatch():
    sched = S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=4, noise_floor=2.0)
    for i in range(10):
        sched.observe(i, 1.0 + 0.1 * (i % 3))
    state = sched.state_dict()
    again = S.schedule_from_state(state)
    assert again.state_dict() == state
    old = {k: v for k, v in state.items() if k not in ("noise_floor", "loss_sq_sum")}   # written before the floor
    old["indicator"] = {k: v for k, v in state["indicator"].items() if k not in ("noise_floor", "last_threshold")}
    with pytest.raises(FracgraphError, match="noise_floor"):
        S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=4, noise_floor=2.0).load_state_dict(old)
    S.PFQSchedule([3, 4, 6, 8], [6, 6, 8, 8], epoch_iters=4, noise_floor=0.0).load_state_dict(old)
