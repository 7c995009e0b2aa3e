"""One root for every error thoughtscope raises on bad input, so callers (and the CLI) catch one thing.

Every area's subclass (``StoreError``, ``SAEError``, ...) is defined here, on the ground floor, so a module
raises another area's error without importing that area; each is still importable from its old home.
They all derive from ``ThoughtscopeError``. Most also derive from ``ValueError`` so that code written before the
root existed keeps catching them. Messages name the file or value at fault and what was expected.
"""

from __future__ import annotations


class ThoughtscopeError(Exception):
    """Root of every thoughtscope error; the CLI prints its message as one line instead of a traceback."""


class ProbeError(ThoughtscopeError, ValueError):
    """Bad probe dataset, site, artefact or fitting input; raised before any forward pass where possible."""


class StatisticsError(ThoughtscopeError, ValueError):
    """A statistic asked of data that cannot give it (one class only, no resample with a value)."""


class ServerError(ThoughtscopeError, ValueError):
    """A web server setting that cannot work (host without token, missing artefact named at start)."""


# raised by documents
class CorpusError(ThoughtscopeError, ValueError):
    """A corpus spec or file that cannot be read as documents."""


class PromptFileError(CorpusError):
    """A prompt file that cannot be read as prompts (missing, bad JSON, no text field, no prompt at all)."""


# raised by documents
class CorpusNotFoundError(CorpusError, FileNotFoundError):
    """The path named by a corpus spec does not exist."""


# raised by analyzer
class AnalyzerError(ThoughtscopeError, ValueError):
    """Bad analyzer input (empty or over-long text, a feature index the SAE does not have)."""


# raised by sites
class SiteError(ThoughtscopeError, ValueError):
    """A site string or index that does not name a place in the model."""


# raised by harvest
class HarvestError(ThoughtscopeError, ValueError):
    """A harvest that cannot run as configured; the message names the field or store at fault."""


# raised by llm
class LLMError(ThoughtscopeError, RuntimeError):
    """An LLM endpoint or the local model could not give a usable answer (after retries, where retrying made
    sense), or was configured with values it cannot use; the message names the URL or setting at fault."""


# raised by steer.interventions
class SteerError(ThoughtscopeError, ValueError):
    """Bad steering input (feature index, vector size, value, preset, prompt); raised before any generation."""


# raised by nla.core
class NLAError(ThoughtscopeError, ValueError):
    """Bad input to an NLA: wrong vector size, missing marker, mismatched checkpoint, bad explanation."""


# raised by atlas.heldout
class ExplainerError(ThoughtscopeError, RuntimeError):
    """The explainer or scorer could not produce a usable answer (after retries, where retrying made sense), or
    was configured with values it cannot use; the message says which."""


# raised by atlas.schema
class AtlasError(ThoughtscopeError, ValueError):
    """A missing, corrupt or mismatched atlas, or a query it cannot answer; the message says which."""


# raised by sae.config
class SAEError(ThoughtscopeError, ValueError):
    """Bad SAE configuration, file or input; the message names what was wrong."""


# raised by sae.train
class TrainingDiverged(ThoughtscopeError, RuntimeError):
    """The loss became NaN/Inf; the last good checkpoint is kept."""


# raised by store.format
class StoreError(ThoughtscopeError, ValueError):
    """Any problem with an activation store or with arguments given to it."""


# raised by store.format
class StoreNotFoundError(StoreError, FileNotFoundError):
    """The store folder or its manifest does not exist."""


# raised by store.format
class StoreCorruptError(StoreError):
    """Files on disk disagree with the manifest (missing, truncated, wrong checksum, bad JSON)."""


# raised by store.format
class StoreMismatchError(StoreError):
    """A writer was re-opened on an existing store with different arguments."""


# raised by features
class FeatureError(ThoughtscopeError, ValueError):
    """A feature query that cannot be answered as asked (bad texts, index, or missing reference)."""


# raised by models
class ModelError(ThoughtscopeError, ValueError):
    """A model could not be loaded or does not expose what thoughtscope needs."""


class CausalError(ThoughtscopeError, ValueError):
    """Bad input to patching, lenses or attribution (prompts that do not align, a target that is not one token)."""
