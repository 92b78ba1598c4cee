"""Every key that crosses the server <-> site boundary, in one place.

Kebab-case at Flower boundaries (record and config keys), as Flower itself does
(``num-examples``, ``server-round``). Server and site import these names; neither spells a
key by hand.
"""

# Record names inside a Message's RecordDict
ARRAYS = "arrays"            # ArrayRecord: model weights (global in, local out)
CONFIG = "config"            # ConfigRecord: what the server asks for
METRICS = "metrics"          # MetricRecord: numbers the site reports
SITE = "site"                # ConfigRecord: who answered (site id, data manifest fingerprint)

# Server -> site, in CONFIG
SERVER_ROUND = "server-round"        # injected by Flower's strategies themselves
MODEL_NAME = "model-name"            # a name in models.MODELS (closed registry)
MODEL_OPTIONS = "model-options"      # JSON object of that model's config fields
TASK_NAME = "task-name"              # a name in models.TASKS
TASK_OPTIONS = "task-options"        # JSON object
CLASS_NAMES = "class-names"          # list[str]: label vocabulary of labels.csv
IMAGE_SIZE = "image-size"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LR = "lr"
WEIGHT_DECAY = "weight-decay"
SEED = "seed"
PROXIMAL_MU = "proximal-mu"          # FedProx; the key Flower's FedProx itself injects
LOCAL_PARAMS = "local-params"        # list[str]: fnmatch patterns of parameters kept at sites
PERSONALIZE = "personalize"          # bool: also report the site's locally adapted model

# Site -> server, in SITE
SITE_ID = "site-id"
MANIFEST = "manifest-fingerprint"    # hash of the de-identified study manifest, no PHI
INGEST = "ingest-report"             # JSON of counts: files, images, skipped by reason, ...

# Site -> server, in METRICS
NUM_EXAMPLES = "num-examples"        # FedAvg's weighting key
TRAIN_SECONDS = "train-seconds"      # site compute time, for framework-overhead accounting
EVAL_SECONDS = "eval-seconds"
EVAL_SPLITS = ("val", "test")        # evaluate replies carry f"{split}-{metric}" keys
PERSONAL_PREFIX = "personal-"        # ... and f"personal-{split}-{metric}" when personalizing
AUROC_DEFINED = "auroc-defined"      # 0/1: AUROC needs >= 2 classes in the split

# Operator-owned node config (set on the SuperNode; the server cannot change these)
NODE_SITE_ID = "site-id"
NODE_DATA_DIR = "data-dir"
NODE_DEVICE = "device"
NODE_TORCH_THREADS = "torch-threads"
NODE_PARTITION_ID = "partition-id"   # set by Flower's simulation engine

# Run config (pyproject [tool.flwr.app.config] / `flwr run --run-config`)
RUN_EXPERIMENT = "experiment"
RUN_OVERRIDES = "overrides"
RUN_SIM_DATA_ROOT = "sim-data-root"
