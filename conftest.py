"""Repository-wide pytest options.

`--reference` grades the lessons' tests against the reference implementation in
`minimind_v/` instead of the learner's `lessons/NN-topic/exercise.py` (see lessons/README.md).
"""


def pytest_addoption(parser):
    parser.addoption("--reference", action="store_true", default=False,
                     help="run lesson tests against minimind_v instead of the lesson's exercise.py")
