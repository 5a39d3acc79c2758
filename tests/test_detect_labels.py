"""The explanation labeller on crafted trajectories: each cause of a task is found where the privileged state shows
it, with the numbers that make it specific; the state layouts match the simulator's; phrasings split into
training and held-out ones; the dense share follows the sparse:dense ratio."""

from __future__ import annotations

import numpy as np
import pytest

from afil_ray.detect.causes import HELDOUT_PHRASINGS, SUCCESS, TAXONOMY, tilt_from_upright
from afil_ray.detect.labels import diagnose, explain, is_dense, label
from afil_ray.replay.episode import Episode

UPRIGHT_Q = (np.cos(np.pi / 4), 0.0, -np.sin(np.pi / 4), 0.0)  # rotates the local x axis onto the vertical
LYING_Q = (np.cos(np.pi / 4), np.sin(np.pi / 4), 0.0, 0.0)  # the peg's reset orientation (euler pi/2 about x)


def _episode(task: str, steps: int, success_at: int | None = None, **tracks: np.ndarray) -> Episode:
    """An episode of ``steps`` actions whose state-mode observations carry ``tracks`` (quantity -> [steps+1, n],
    or one row held for the whole episode) in the task's layout; everything else zero."""
    layout = TAXONOMY[task].layout
    states = np.zeros((steps + 1, max(s.stop for s in layout.values())), np.float32)
    states[:, layout["tcp_pose"]] = [1.0, 1.0, 1.0, 1, 0, 0, 0]  # far from everything unless a track says so
    for name, track in tracks.items():
        states[:, layout[name]] = np.broadcast_to(np.asarray(track, np.float32), (steps + 1, layout[name].stop -
                                                                                     layout[name].start))
    step_success = np.zeros(steps, bool)
    if success_at is not None:
        step_success[success_at:] = True
    return Episode(task=task, outcome="success" if success_at is not None else "failure", state=states[:-1],
                   action=np.zeros((steps, 8), np.float32), reward=np.zeros(steps, np.float32),
                   step_success=step_success, terminated=np.zeros(steps, bool), truncated=np.zeros(steps, bool),
                   final_state=states[-1], seed=0)


def _pose(xyz, q=(1, 0, 0, 0)) -> np.ndarray:
    return np.array([*xyz, *q], np.float32)


def _path(start, end, steps: int, hold_from: int | None = None) -> np.ndarray:
    """A straight path from start to end over the episode, reaching end at ``hold_from`` (the end by default)."""
    hold_from = steps if hold_from is None else hold_from
    frac = np.clip(np.arange(steps + 1) / max(hold_from, 1), 0.0, 1.0)[:, None]
    start, end = np.asarray(start, np.float64), np.asarray(end, np.float64)
    return start + frac * (end - start)


def _pose_path(start, end, steps, q=(1, 0, 0, 0), hold_from=None) -> np.ndarray:
    xyz = _path(start, end, steps, hold_from)
    return np.concatenate([xyz, np.tile(q, (steps + 1, 1))], axis=1)


GOAL = np.array([-0.2, 0.0, 0.001])  # PullCube: the goal disc is behind the cube (toward the robot)
CUBE = np.array([0.0, 0.0, 0.02])


@pytest.mark.parametrize(("tracks", "cause", "facts"), [
    ({"obj_pose": _pose(CUBE)}, "never_reached", {"cm": 100.0 * float(np.linalg.norm([1, 1, 0.98]))}),
    ({"obj_pose": _pose(CUBE), "tcp_pose": _pose_path([0.3, 0, 0.3], [0.03, 0, 0.02], 40)}, "not_moved", {}),
    ({"obj_pose": _pose_path(CUBE, [0.15, 0.0, 0.02], 40), "tcp_pose": _pose([0, 0, 0.02])},
     "wrong_direction", {"farther_cm": 15.0}),
    ({"obj_pose": _pose_path(CUBE, [-0.2, 0.15, 0.02], 40), "tcp_pose": _pose([0, 0, 0.02])},
     "sideways", {"cm": 15.0}),
    ({"obj_pose": _pose_path(CUBE, [-0.05, 0.0, 0.02], 40, hold_from=30), "tcp_pose": _pose([0, 0, 0.02])},
     "stopped_short", {"cm": 5.0}),
    ({"obj_pose": _pose_path(CUBE, [0.0, 0.0, -0.3], 40), "tcp_pose": _pose([0, 0, 0.02])}, "off_table", {}),
])
def test_pull_cube_causes(tracks, cause, facts):
    episode = _episode("PullCube-v1", 40, goal_pos=GOAL, **tracks)
    found = diagnose(episode)
    assert found.cause == cause
    for name, value in facts.items():
        assert found.facts[name] == pytest.approx(value, abs=0.2)


def test_stopped_short_names_the_step_the_cube_stopped():
    episode = _episode("PullCube-v1", 40, goal_pos=GOAL, tcp_pose=_pose([0, 0, 0.02]),
                       obj_pose=_pose_path(CUBE, [-0.05, 0.0, 0.02], 40, hold_from=30))
    assert 27 <= diagnose(episode).step <= 30


def test_stack_cube_dropped_after_lift_names_step_and_height():
    steps = 60
    height = np.concatenate([np.linspace(0.02, 0.10, 21), np.full(15, 0.10), np.full(steps + 1 - 36, 0.02)])
    a = np.concatenate([np.zeros((steps + 1, 2)), height[:, None], np.tile([1, 0, 0, 0], (steps + 1, 1))], 1)
    episode = _episode("StackCube-v1", steps, cubeA_pose=a, cubeB_pose=_pose([0.1, 0.1, 0.02]),
                       tcp_pose=_pose([0, 0, 0.02]))
    found = diagnose(episode)
    assert (found.cause, found.step) == ("dropped", 36)
    assert found.facts["cm"] == pytest.approx(8.0)
    assert "step 36" in explain(found, "StackCube-v1", "any-id") or "8.0 cm" in explain(found, "StackCube-v1", "x")


@pytest.mark.parametrize(("gripper_gap", "cause"), [(0.04, "not_released"), (0.08, "not_settled")])
def test_stack_cube_on_top_but_failed(gripper_gap, cause):
    on_top = _pose_path([0, 0, 0.02], [0.1, 0.1, 0.06], 50)
    qpos = np.zeros(9)
    qpos[7:] = gripper_gap / 2
    episode = _episode("StackCube-v1", 50, cubeA_pose=on_top, cubeB_pose=_pose([0.1, 0.1, 0.02]),
                       tcp_pose=_pose([0, 0, 0.02]), qpos=qpos)
    assert diagnose(episode).cause == cause


def test_stack_cube_knocked_base_wins_over_later_mistakes():
    a = _pose_path([0, 0, 0.02], [0.0, 0.0, 0.1], 50)
    b = _pose_path([0.1, 0.1, 0.02], [0.16, 0.1, 0.02], 50)
    found = diagnose(_episode("StackCube-v1", 50, cubeA_pose=a, cubeB_pose=b, tcp_pose=_pose([0, 0, 0.02])))
    assert found.cause == "knocked_base" and found.facts["cm"] == pytest.approx(6.0)


def test_peg_tilt_and_cause():
    assert tilt_from_upright(_pose([0, 0, 0], LYING_Q)) == pytest.approx(90.0)
    assert tilt_from_upright(_pose([0, 0, 0], UPRIGHT_Q)) == pytest.approx(0.0, abs=1e-4)
    half_way = (np.cos(np.pi / 8), 0.0, -np.sin(np.pi / 8), 0.0)  # the long axis 45 degrees up
    steps = 80
    peg = np.concatenate([_pose_path([0, 0, 0.025], [0, 0, 0.06], 40, LYING_Q),
                          _pose_path([0, 0, 0.06], [0, 0, 0.09], 40, half_way)[1:]])
    found = diagnose(_episode("LiftPegUpright-v1", steps, obj_pose=peg, tcp_pose=_pose([0, 0, 0.03])))
    assert found.cause == "tilted" and found.facts["deg"] == 45
    upright_high = _pose_path([0, 0, 0.025], [0, 0, 0.16], steps, UPRIGHT_Q)
    found = diagnose(_episode("LiftPegUpright-v1", steps, obj_pose=upright_high, tcp_pose=_pose([0, 0, 0.03])))
    assert found.cause == "not_on_table" and found.facts["cm"] == pytest.approx(4.0)


def test_success_is_its_own_cause_with_its_step():
    episode = _episode("PullCube-v1", 30, success_at=12, goal_pos=GOAL, obj_pose=_pose(GOAL + np.array([0, 0, 0.02])))
    found = diagnose(episode)
    assert (found.cause, found.step) == (SUCCESS, 12)


def test_phrasings_split_and_every_template_formats():
    for task, spec in TAXONOMY.items():
        for name in spec.names:
            cause = spec.cause(name)
            assert len(cause.heldout) == HELDOUT_PHRASINGS and len(cause.training) >= 2, (task, name)
            assert not set(cause.heldout) & set(cause.training)
            facts = {"cm": 1.0, "farther_cm": 2.0, "away_cm": 3.0, "deg": 40}
            for template in cause.phrasings:
                assert "{" not in template.format(step=7, **facts)


def test_heldout_explanations_never_appear_in_training():
    spec = TAXONOMY["PullCube-v1"]
    episode = _episode("PullCube-v1", 40, goal_pos=GOAL, obj_pose=_pose(CUBE))
    found = diagnose(episode)
    trained = {explain(found, "PullCube-v1", f"ep{i}") for i in range(200)}
    heldout = {explain(found, "PullCube-v1", f"ep{i}", heldout=True) for i in range(50)}
    assert len(trained) == len(spec.cause("never_reached").training)  # every training phrasing gets used
    assert heldout and not trained & heldout


@pytest.mark.parametrize("ratio", [0, 2, 30])
def test_dense_share_follows_the_ratio(ratio):
    ids = [f"episode-{i}" for i in range(6000)]
    share = np.mean([is_dense(i, ratio) for i in ids])
    assert share == pytest.approx(1.0 / (1 + ratio), abs=0.02)
    episode = _episode("PullCube-v1", 10, goal_pos=GOAL, obj_pose=_pose(CUBE))
    sparse = label(episode, sparse_per_dense=1e9)
    assert not sparse.dense and sparse.cause is None and sparse.success is False
    assert label(episode, sparse_per_dense=0).cause == "never_reached"


def test_unknown_task_and_image_episode_are_clear_errors():
    episode = _episode("PullCube-v1", 10, goal_pos=GOAL)
    with pytest.raises(KeyError, match="no failure-cause taxonomy for task 'Nope-v1'"):
        diagnose(Episode(**{**episode.__dict__, "task": "Nope-v1"}))
    with pytest.raises(ValueError, match="obs_mode 'rgb'"):
        diagnose(Episode(**{**episode.__dict__, "obs_mode": "rgb"}))


def test_layouts_match_the_simulator():
    """The columns each task's rule reads are where ManiSkill's flattened state puts those quantities."""
    gym = pytest.importorskip("gymnasium")
    pytest.importorskip("mani_skill.envs")
    for task, spec in TAXONOMY.items():
        env = gym.make(task, obs_mode="state_dict", num_envs=1)
        try:
            obs, _ = env.reset(seed=0)
            offset, found = 0, {}
            for group in ("agent", "extra"):
                for name, value in obs[group].items():
                    width = int(np.prod(value.shape[1:])) if value.dim() > 1 else 1
                    found[name] = slice(offset, offset + width)
                    offset += width
            for name, cols in spec.layout.items():
                assert found[name] == cols, (task, name)
        finally:
            env.close()
