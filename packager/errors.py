"""Every error the packager raises on purpose, in one tree. Each is one line on stderr and an exit status
(docs/errors.md):

    EdgeshipError (agent.errors)
    ├── PackagerError           exit_code 2
    │   ├── InputError          a file or argument the user gave is wrong                      2
    │   ├── ConversionError     an exporter, quantizer or converter could not handle the model  2
    │   ├── AccuracyGateError   an int8 artifact, pruning or a distilled student lost too much  3
    │   ├── RepoError           the TUF repository, its keys or a target                        2
    │   └── PublishError        the files to publish are inconsistent                           2
    ├── BundleRejected (agent)  `packager inspect/publish` on a bad bundle                      2
    └── TransportError (agent)  the broker could not be reached or refused                      4
    ValueError
    └── RefusedPickle           a model file's pickle could import or call code (-> InputError)
        └── RefusedGraph        a .pt2's program JSON would make torch run code (-> InputError)

RefusedPickle/RefusedGraph are the stdlib-only scanners' verdicts; `packager.torch_model` re-raises them as
InputError naming the file, so they never reach the command line themselves.
"""

from agent.errors import EdgeshipError


class PackagerError(EdgeshipError):
    """Base of the packager's errors; `exit_code` is the status `packager` exits with."""

    exit_code = 2


class InputError(PackagerError):
    """A file or argument the user gave is missing, unreadable or does not fit the model."""


class ConversionError(PackagerError):
    """An exporter, quantizer or converter could not handle the model."""


class AccuracyGateError(PackagerError):
    """An int8 artifact, a pruned model or a distilled student lost more accuracy than --max-drop allows, or no
    int8 recipe pays (larger or slower than fp32: packager/verdict.py)."""

    exit_code = 3


class RepoError(PackagerError):
    """The TUF repository is missing, corrupt, lacks keys, or the request does not fit it."""


class PublishError(PackagerError):
    """The files to publish are inconsistent (a target changed since it was signed, bad names, ...)."""


class RefusedPickle(ValueError):
    """A model file holds a pickle (or an entry) that loading could use to import or call code."""


class RefusedGraph(RefusedPickle):
    """The exported program's JSON holds something torch would evaluate, import or execute as code."""
