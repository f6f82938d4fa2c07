"""Errors that carry a message meant for the user (the CLI prints them as one line).

Errors carry facts as attributes; ``ovss_cli.hints`` renders the command to run from them.
"""

from __future__ import annotations


class OvssError(Exception):
    """Base class of every error whose message is a complete instruction for the user."""


class WeightsNotFoundError(OvssError):
    """A checkpoint is needed but is not on disk and cannot be downloaded."""


class StoreError(OvssError):
    """A store is missing, malformed, or does not hold what was asked for."""


class ProvenanceMismatchError(StoreError):
    """A feature set exists but was made with other settings than the caller requires."""


class ImageReadError(OvssError):
    """An image file could not be decoded."""


class MissingFeatureSetError(ProvenanceMismatchError):
    """A feature set a caller needs is absent, incomplete, lacks tensors, or was made with other
    settings. Carries the facts; the CLI renders the command that makes it.

    Attributes:
        store: the store path.
        model: the backbone name of the set.
        protocol: the :class:`~featurestore.protocol.Protocol` it needs (or None).
        tensors: the tensors it needs (may be empty).
        reason: ``missing``, ``incomplete``, ``tensors`` (lacks some), ``mismatch``
            (other settings) or ``weights`` (other weights).
        role: the role the set plays for the caller (``clip``, ``vfm``, ...) or ''.
        needed_by: the method/trainer that needs it ('' when unknown), so the CLI can propose
            ``extract --for NEEDED_BY``.
    """

    def __init__(
        self,
        message: str,
        store: str = "",
        model: str = "",
        protocol: object = None,
        tensors: tuple[str, ...] = (),
        reason: str = "missing",
        role: str = "",
        needed_by: str = "",
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.store = store
        self.model = model
        self.protocol = protocol
        self.tensors = tuple(tensors)
        self.reason = reason
        self.role = role
        self.needed_by = needed_by
        self.extra = dict(extra or {})

    def with_message(self, message: str, **changes) -> MissingFeatureSetError:
        """The same facts (``changes`` replace some) under another message, for callers that
        explain the need in their own words."""
        facts = {
            k: getattr(self, k)
            for k in ("store", "model", "protocol", "tensors", "reason", "role", "needed_by")
        }
        facts.update(changes)
        return MissingFeatureSetError(message, extra=self.extra, **facts)


class MissingTextSetError(ProvenanceMismatchError):
    """The text embeddings of a vocabulary are not in the store (or were made with another
    encoder).

    Attributes:
        store: the store path.
        text_model: the text encoder's name.
        vocab_spec: the vocabulary spec (``dataset:ade20k/sclip``, a class file, a list).
        templates: the template set name.
        weights: the weights identity needed (``random-init:N``, a sha256, or None: any real).
        reason: ``missing`` or ``mismatch``.
    """

    def __init__(
        self,
        message: str,
        store: str = "",
        text_model: str = "",
        vocab_spec: str = "",
        templates: str = "",
        weights: str | None = None,
        reason: str = "missing",
    ):
        super().__init__(message)
        self.store = store
        self.text_model = text_model
        self.vocab_spec = vocab_spec
        self.templates = templates
        self.weights = weights
        self.reason = reason


class MissingLabelSetError(StoreError):
    """A label set (pseudo-labels, cluster masks) is not in the store.

    Attributes:
        store: the store path.
        name: the label set's name.
        available: the label sets the store has.
    """

    def __init__(self, message: str, store: str = "", name: str = "", available=()):
        super().__init__(message)
        self.store = store
        self.name = name
        self.available = tuple(available)


class StoreNotFoundError(StoreError):
    """No store at a path (nothing there, or the creation never began).

    Attributes:
        store: the path.
    """

    def __init__(self, message: str, store: str = ""):
        super().__init__(message)
        self.store = store


class FeatureSetExistsError(ProvenanceMismatchError):
    """Creating a feature set that exists with other settings (the caller may replace it).

    Attributes:
        store: the store path.
        key: the feature set's key (``model@protocol``).
        differences: what differs (``protocol``, ``tensors``, ``dtype``, ``weights``).
    """

    def __init__(self, message: str, store: str = "", key: str = "", differences=()):
        super().__init__(message)
        self.store = store
        self.key = key
        self.differences = tuple(differences)


class StoreImagesMismatchError(StoreError):
    """A store holds other images than the ones requested (a different list, or an image
    whose file content changed since the store recorded it).

    Attributes:
        store: the store path.
        reason: ``list`` (other ids or order) or ``content`` (a file changed).
        paths: the image files concerned (for ``content``).
    """

    def __init__(self, message: str, store: str = "", reason: str = "list", paths=()):
        super().__init__(message)
        self.store = store
        self.reason = reason
        self.paths = tuple(paths)


class CorruptStoreError(StoreError):
    """A store's data is damaged (a truncated chunk, unreadable metadata).

    Attributes:
        store: the store path.
        key: the feature set concerned ('' when the store itself).
        tensor: the tensor concerned ('' when none).
        block: the block index (-1 when none).
    """

    def __init__(
        self, message: str, store: str = "", key: str = "", tensor: str = "", block: int = -1
    ):
        super().__init__(message)
        self.store = store
        self.key = key
        self.tensor = tensor
        self.block = block


class RemoteStoreError(StoreError):
    """An object-storage store cannot be used: the server is unreachable, credentials are
    missing or refused, or the bucket does not exist (``featurestore.remote``).

    Attributes:
        store: the store URL (credentials masked).
        reason: ``unreachable``, ``credentials``, ``denied``, ``no-bucket`` or ``io``.
        endpoint: the endpoint tried ('' when not known).
    """

    def __init__(self, message: str, store: str = "", reason: str = "io", endpoint: str = ""):
        super().__init__(message)
        self.store = store
        self.reason = reason
        self.endpoint = endpoint


class ImagesNotInStoreError(StoreError):
    """None of a dataset's images is in a store (it was extracted from other images).

    Attributes:
        store: the store path.
        dataset: the dataset name.
        data_root: where the dataset's images are.
        count: how many images were looked for.
    """

    def __init__(
        self, message: str, store: str = "", dataset: str = "", data_root: str = "", count: int = 0
    ):
        super().__init__(message)
        self.store = store
        self.dataset = dataset
        self.data_root = data_root
        self.count = count


class NonFiniteFeaturesError(StoreError):
    """A feature a method reads holds NaN or inf (a damaged store, or a model that overflowed
    in fp16): no number is computed from it.

    Attributes:
        store: the store's path or URL.
        feature_set: the set's key (``clip-b16@short448``).
        image_id: the image whose features are not finite.
        tensor: the tensor's name (``patch``, ``pre_last``...).
        count: how many values of that image's tensor are NaN or inf.
    """

    def __init__(self, store: str, feature_set: str, image_id: str, tensor: str, count: int):
        super().__init__(
            f"feature set '{feature_set}' holds {count} NaN/inf value(s) in '{tensor}' for image "
            f"'{image_id}' (store {store}); no result is computed from non-finite features"
        )
        self.store, self.feature_set, self.image_id = store, feature_set, image_id
        self.tensor, self.count = tensor, count
