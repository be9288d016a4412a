"""How failures raised inside Ray reach the terminal: ``jobs.cli.one_line`` on Ray's own exception classes.

The end-to-end path (a real run whose model operator fails, exit 1, one line) is
``tests/integration/test_cli.py::test_an_error_inside_a_ray_task_is_one_line_exit_1_and_debug_shows_the_traceback``;
these cover the shapes that run does not produce every time.
"""

from __future__ import annotations

import ray.exceptions as rex
from ray.data.exceptions import SystemException

from ground.errors import ConfigError
from jobs.cli import one_line, our_error


def _remote(kind: str, message: str) -> rex.RayTaskError:
    """A worker's error as Ray ships it to the driver: the traceback as text, the class lost."""
    trace = f'Traceback (most recent call last):\n  File "operators/models/clip.py", line 40, in __init__\n{kind}: {message}'
    return rex.RayTaskError("MapWorker(MapBatches(ClipEmbedder)).__init__", trace, RuntimeError(message))


def test_an_actor_that_died_in_its_constructor_is_named_by_the_error_that_killed_it():
    # Ray Data raises an empty SystemException while handling the ActorDiedError.
    died = rex.ActorDiedError(cause=_remote("OSError", "model.safetensors: no such file"))
    try:
        try:
            raise died
        except rex.ActorDiedError:
            raise SystemException()  # noqa: B904 - Ray Data raises it this way (implicit context)
    except SystemException as exc:
        assert one_line(exc) == "OSError: model.safetensors: no such file"


def test_an_actor_that_died_without_a_python_error_says_so():
    died = rex.ActorDiedError(cause=None)
    line = one_line(died)
    assert line.startswith("ActorDiedError: ") and len(line.splitlines()) == 1 and len(line) > len("ActorDiedError: ")


def test_our_own_error_from_a_dead_actor_keeps_its_line_and_exit_code():
    # A model actor refusing a missing local path on a cluster: only the text comes back.
    died = rex.ActorDiedError(cause=_remote("ground.errors.ConfigError",
                                            "model '/m/clip': no such file or folder on node-7"))
    try:
        try:
            raise died
        except rex.ActorDiedError:
            raise SystemException()  # noqa: B904
    except SystemException as exc:
        ours = our_error(exc)
        assert isinstance(ours, ConfigError) and ours.exit_code == 2
        assert one_line(exc) == str(ours) == "model '/m/clip': no such file or folder on node-7"
    # Anyone else's error of the same shape is not taken for ours.
    other = rex.ActorDiedError(cause=_remote("OSError", "model.safetensors: no such file"))
    assert our_error(other) is None
