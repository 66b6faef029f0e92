"""User-input errors: one type, caught once by the command line (one line on stderr, exit 2).

A leaf module (imports nothing of the project), so every layer can raise these without an import
circle. Anything else that escapes a job is a bug and keeps its traceback.

    InputError
    ├── ConfigError        a setting has the wrong type, an unknown choice, or is missing
    ├── CollectionError    a collection (folder, manifest, revisited .pkl) cannot be read
    ├── GroundTruthError   ground truth that cannot serve for evaluation (also: refused pickles)
    ├── ArtifactError      an artifact is missing, or was made by another schema version
    └── SettingsMismatch   a root was made under other settings, or from another collection

    MachineError           what the machine did, not the user (Ray cannot start, storage unreachable):
                           one line, exit 1
"""

from __future__ import annotations


class InputError(Exception):
    """A mistake in what the user gave the job; its message is the one line the user sees."""


class ConfigError(InputError, ValueError):
    """A config value has the wrong type, an unknown choice or key, or a required one is missing."""


class CollectionError(InputError, ValueError):
    """The collection cannot be read (missing file column, unknown format, empty folder…)."""


class GroundTruthError(InputError, ValueError):
    """Ground truth that cannot be used: no groups, unknown queries, refused or malformed pickles."""


class ArtifactError(InputError):
    """An artifact is missing, or was made by an incompatible schema version."""


class SettingsMismatch(InputError, ValueError):
    """The root was made under other settings (shards, stored whitening, codebook) or from a
    collection holding images the new one lacks."""


class MachineError(Exception):
    """The machine failed the job (Ray cannot start, a storage endpoint is unreachable); one line, exit 1."""
