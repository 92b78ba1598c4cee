"""Every key that crosses the server <-> site boundary, in one place.

Kebab-case at Flower boundaries (record and config keys), as Flower itself does
(``num-examples``, ``server-round``). Server and site import these names; neither spells a
key by hand.
"""

# Record names inside a Message's RecordDict
ARRAYS = "arrays"            # ArrayRecord: model weights (global in, local out)
FROZEN_ARRAYS = "frozen-arrays"   # ArrayRecord: weights that do not train (linear probe,
                                  # LoRA base); sent to sites, never sent back
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
HEAD_LR = "head-lr"                  # optional: the class head's own learning rate
HEAD_ONLY_ROUNDS = "head-only-rounds"  # optional: rounds 1..k train the class head alone
HEAD_LR_ROUNDS = "head-lr-rounds"      # optional: head-lr applies in rounds 1..k only
SEED = "seed"
PROXIMAL_MU = "proximal-mu"          # FedProx; the key Flower's FedProx itself injects
LOCAL_PARAMS = "local-params"        # list[str]: fnmatch patterns of parameters kept at sites
PERSONALIZE = "personalize"          # bool: also report the site's locally adapted model
RUN_ID = "run-id"                    # the server's run (privacy ledger rows name it)
BASE_DIGEST = "base-digest"          # foundation model: sha256 of the frozen base weights the
                                     # coordinator built; each site checks its own copy against it
DATA_LAYOUT = "data-layout"          # JSON object: a modality layout (protocol.layout), validated
                                     # by the site; absent: brain_mri_4seq (sequences.py)

# Server -> site, in CONFIG: the privacy the server asks for (a site checks it against its own
# budget in node config and refuses what would exceed it; it never takes a budget from here)
DP_MECHANISM = "dp-mechanism"        # one of DP_MECHANISMS
DP_NONE, DP_SGD, DP_SITE = "none", "dp-sgd", "site-dp"
DP_MECHANISMS = (DP_NONE, DP_SGD, DP_SITE)
DP_TARGET_EPSILON = "dp-target-epsilon"  # dp-sgd: calibrate sigma to reach this over the run
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # > 0: use this sigma instead of calibrating
DP_MAX_GRAD_NORM = "dp-max-grad-norm"    # dp-sgd: per-sample clipping bound C
DP_SAMPLE_RATE = "dp-sample-rate"        # dp-sgd: Poisson rate q; 0 -> batch-size / n
DP_HEAD_CLIP_SHARE = "dp-head-clip-share"  # dp-sgd: the head's share of C^2; 0 -> one bound
DP_AUGMENTATION_MULTIPLICITY = "dp-augmentation-multiplicity"  # dp-sgd: views per sample
DP_PLANNED_ROUNDS = "dp-planned-rounds"  # rounds the run plans (calibration, budget check)
DP_ACCOUNTANT = "dp-accountant"          # protocol.accounting.ACCOUNTANTS
# site-dp: the clipping bound travels under Flower's own key (fixedclipping_mod reads it)
DP_CLIPPING_NORM = "clipping_norm"
DP_UNIT_WEIGHT = "dp-unit-weight"        # site-dp: 1.0 per site (noise calibrated to equal weights)
DP_NOISE = "dp-noise"                    # site-dp: who adds the noise (DP_NOISE_SOURCES)
DP_NOISE_DISTRIBUTED, DP_NOISE_SERVER = "distributed", "server"   # sites before masking / server
DP_NOISE_SOURCES = (DP_NOISE_DISTRIBUTED, DP_NOISE_SERVER)
DP_MIN_CONTRIBUTORS = "dp-min-contributors"  # distributed: each share assumes only this many

# Secure aggregation (SecAgg+). Stage messages carry a SECAGG ConfigRecord; node ids travel
# as strings (Flower node ids can exceed int64).
SECAGG = "secagg"                    # ConfigRecord name in stage requests and replies
SECAGG_STAGE = "secagg-stage"        # in CONFIG (train messages) and SECAGG: one of the stages
SECAGG_SETUP, SECAGG_SHARE, SECAGG_MASKED, SECAGG_UNMASK = "setup", "share-keys", "masked", \
    "unmask"
SECAGG_CONSISTENCY = "consistency"  # malicious-secure mode: survivors sign the survivor set
SECAGG_ROUND = "secagg-round"
SECAGG_AUTHENTICATED = "secagg-authenticated"  # setup: true = malicious-secure (signed) mode
SECAGG_SITE_ID = "secagg-site-id"    # setup reply: the registered site id (str)
SECAGG_SIGNATURE = "secagg-signature"  # setup / consistency reply: session signature (bytes)
SECAGG_SESSION_KEY = "secagg-session-key"  # setup reply: the site's run session key (bytes)
SECAGG_ENDORSEMENT = "secagg-endorsement"  # setup reply: identity signature of that key
SECAGG_SESSION_KEYS = "secagg-session-keys"  # share-keys: list[bytes] aligned with SECAGG_NODES
SECAGG_ENDORSEMENTS = "secagg-endorsements"  # share-keys: list[bytes] aligned with SECAGG_NODES
SECAGG_SITE_IDS = "secagg-site-ids"  # share-keys: list[str] aligned with SECAGG_NODES
SECAGG_SIGNATURES = "secagg-signatures"  # list[bytes] aligned with SECAGG_NODES
SECAGG_NEIGHBOURS = "secagg-neighbours"  # share-keys: list[str], the server's neighbour list
SECAGG_DEGREE = "secagg-degree"
SECAGG_CLIP_RANGE = "secagg-clip-range"
SECAGG_MAX_SITES = "secagg-max-sites"
SECAGG_MAX_WEIGHT = "secagg-max-weight"
SECAGG_THRESHOLD = "secagg-threshold"
SECAGG_PK_ENC = "secagg-pk-enc"      # bytes (reply) / list[bytes] aligned with SECAGG_NODES
SECAGG_PK_MASK = "secagg-pk-mask"
SECAGG_NODES = "secagg-nodes"        # list[str]: the node ids the lists beside it refer to
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"    # list[bytes], aligned with SECAGG_NODES
SECAGG_SURVIVED = "secagg-survived"  # list[str]: the survivor set (consistency, unmask)
SECAGG_SEED_NODES = "secagg-seed-nodes"      # unmask reply: whose self-mask shares ...
SECAGG_SEED_SHARES = "secagg-seed-shares"    # ... and the shares
SECAGG_KEY_NODES = "secagg-key-nodes"        # whose masking-key shares (dropped sites) ...
SECAGG_KEY_SHARES = "secagg-key-shares"
SECAGG_MASKED_ARRAY = "secagg-masked"        # the one array of a masked train reply (uint32)
SECAGG_CLIPPED = "secagg-clipped"            # metric of a secure sum: values clipped by the
                                             # encoding, all sites (from the sum's header)
SECAGG_SITES = "secagg-sites"                # metric of the summed reply: sites inside it
SECAGG_STATE = "medfed.secagg"               # site node state of the round in progress
SECAGG_SESSION_STATE = "medfed.secagg-session"  # site node state: its run session (all rounds)

# Site -> server, in SITE
SITE_ID = "site-id"
MANIFEST = "manifest-fingerprint"    # hash of the de-identified study manifest, no PHI
INGEST = "ingest-report"             # JSON of counts: files, images, skipped by reason, ...

# Site -> server, in METRICS
NUM_EXAMPLES = "num-examples"        # FedAvg's weighting key
TRAIN_SECONDS = "train-seconds"      # site compute time, for framework-overhead accounting
LOCAL_STEPS = "steps"                # optimizer steps this round (the engine's count; FedNova)
EVAL_SECONDS = "eval-seconds"
EVAL_SPLITS = ("val", "test")        # evaluate replies carry f"{split}-{metric}" keys
PERSONAL_PREFIX = "personal-"        # ... and f"personal-{split}-{metric}" when personalizing
WITHOUT_PREFIX = "test-without-"     # ... and f"test-without-{sequence}-{metric}" when asked:
EXTERNAL_SPLIT = "external"          # an external site's replies: f"external-{metric}" (all its
EXTERNAL_WITHOUT_PREFIX = "external-without-"   # labelled studies), f"external-without-{seq}-..."
EVAL_MISSING = "eval-missing-sequences"   # bool config: also score test with each sequence removed
# ... each split's metrics are one SplitMetrics under f"{split}-{field}" (protocol/metrics.py
# encodes and decodes them; nothing else spells these):
EVAL_N = "n"                         # studies evaluated (0: empty split)
EVAL_LOSS = "loss"
EVAL_SECONDS_SPLIT = "seconds"       # wall time of this split
EVAL_CONFUSION = "confusion"         # list[int]: [K, K] counts, row-major (true i, predicted j)
EVAL_FINDINGS = "finding-confusions"  # list[int]: [F, 2, 2] binary counts, one per finding
EVAL_SHAPE = "shape"                 # f"{split}-{confusion key}-shape": list[int], its shape
EVAL_AUROC = "auroc"                 # list[float]: [auroc], or [] where undefined
EVAL_MEAN = "mean-"                  # f"{split}-mean-{name}": per-study mean (pooled by n)
EVAL_COUNT = "count-"                # f"{split}-count-{name}": a count (pooled by sum)
DP_EPSILON = "dp-epsilon"            # the site's cumulative epsilon after this round (its ledger)
DP_DELTA = "dp-delta"                # ... at the site's delta
DP_STEPS = "dp-steps"                # DP-SGD steps this round

# Operator-owned node config (set on the SuperNode; the server cannot change these)
NODE_SITE_ID = "site-id"
# What a site id may be (it names MLflow metrics and tags, console rows, log lines): a
# plain name, 1-64 of letters, digits, ".", "_", "-", not starting with a punctuation mark.
# A site refuses to start with another; the server shows a reply naming another as
# node-<id> (strategies.reply_shape.claimed_site_id).
SITE_ID_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NODE_DATA_DIR = "data-dir"
NODE_DEVICE = "device"
NODE_TORCH_THREADS = "torch-threads"
NODE_DECODE_WORKERS = "decode-workers"   # DICOM decode processes at ingest (default 1)
NODE_PARTITION_ID = "partition-id"   # set by Flower's simulation engine
NODE_DP_EPSILON = "dp-epsilon"       # the site's privacy budget (epsilon, delta) over its life
NODE_DP_DELTA = "dp-delta"
NODE_PRIVACY_DIR = "privacy-dir"     # ledger folder; relative: under data-dir (default .medfed)
NODE_DP_SECURE_MODE = "dp-secure-mode"  # default true: CSPRNG noise; false only for tests
NODE_REQUIRE_DP = "require-dp"       # default true when a budget is set: refuse non-DP training
NODE_REQUIRE_SECAGG = "require-secagg"   # true: refuse to send a plaintext model update
NODE_SECAGG_IDENTITY = "secagg-identity-key"   # the site's identity key (its auth.key)
NODE_SECAGG_PEERS = "secagg-peers"   # the federation's registration list (auth.pub lines),
                                     # distributed out of band, never by the coordinator
NODE_SECAGG_MIN_NEIGHBOURS = "secagg-min-neighbours"       # default 2
NODE_SECAGG_MIN_CONTRIBUTORS = "secagg-min-contributors"   # default 3
NODE_SECAGG_SEMI_HONEST = "secagg-allow-semi-honest"       # default false
NODE_CONFIG_FILE = "node-config.toml"  # simulation: per-site stand-in for --node-config
NODE_ROLE = "role"                   # "train" (default) or "external": evaluates, never trains
NODE_LAYOUT = "layout"               # the layout the site's data were checked with at start
                                     # (a shipped name or the operator's YAML file)
NODE_FOUNDATION_DIR = "foundation-dir"   # the site's own directory of pretrained encoders; a
                                     # job names one by a bare name, never by a path (relative:
                                     # under data-dir)
NODE_DP_MAX_RUN_EPSILON = "dp-max-run-epsilon"     # cap on one run's epsilon (within the budget)
NODE_DP_MIN_NOISE = "dp-min-noise-multiplier"      # refuse rounds with a smaller noise multiplier
NODE_DP_MAX_STEPS = "dp-max-steps-per-round"       # refuse DP-SGD rounds of more steps
NODE_DP_TRUST_SERVER = "dp-trust-server"  # default false: refuse site-dp rounds whose noise the
                                          # server adds (privacy.noise=server)
NODE_DP_MAX_ASSUMED_SITES = "dp-max-assumed-sites"  # distributed site-dp: refuse rounds whose
                                          # noise share assumes more honest contributors
                                          # (privacy.min_contributors) than this site relies on
ROLE_TRAIN = "train"
ROLE_EXTERNAL = "external"
ROLES = (ROLE_TRAIN, ROLE_EXTERNAL)

# Server -> site query (message type "query"), in CONFIG; the reply carries NODE_ROLE in SITE
QUERY = "query"
QUERY_ROLE = "role"
QUERY_POLICY = "policy"              # preflight: the reply carries POLICY (protocol/policy.py)
POLICY = "policy"                    # ConfigRecord: the site's declared policy, flags and its
                                     # own epsilon accounting only, from its node config
POLICY_HAS_BUDGET = "has-budget"     # bool: the operator set a (dp-epsilon, dp-delta) budget
POLICY_EPSILON_SPENT = "dp-epsilon-spent"   # the site's ledger, composed at its own delta
# Asked with the job (the query's CONFIG also holds the experiment's JobSpec record), answered
# as flags only (client/readiness.py); absent when the job does not need them:
POLICY_LAYOUT_OK = "serves-layout"   # bool: the job's layout is one this site can read
POLICY_WEIGHTS_FOUND = "weights-found"   # bool: foundation weights NAME in its foundation-dir
POLICY_WEIGHTS_MATCH = "weights-digest-match"   # bool: its frozen base = the job's digest
POLICY_DP_REFUSAL = "dp-refusal"     # str: the line its DP-SGD check refuses the job's model
                                     # with (layer/method names, no data); absent: none
POLICY_SIZE_REFUSAL = "size-refusal"     # str: the line its size caps refuse the job's model
                                         # with (sizes and node-config caps); absent: none

# Run config (pyproject [tool.flwr.app.config] / `flwr run --run-config`)
RUN_EXPERIMENT = "experiment"
RUN_OVERRIDES = "overrides"
RUN_SIM_DATA_ROOT = "sim-data-root"
RUN_PREFLIGHT_ONLY = "preflight-only"   # "true": the ServerApp runs the preflight and stops
# The ServerApp's preflight lines in its streamed log, which `medfed run` picks out by prefix:
# the verdict, one line per problem, one per warning (what a site may still refuse in round 1)
PREFLIGHT_OK = "preflight ok: "
PREFLIGHT_PROBLEM = "preflight problem: "
PREFLIGHT_WARNING = "preflight warning: "
                                     # (`medfed run --dry-run`); nothing trains, nothing is written

# Site query limits (operator-owned node config; client/queries.py)
NODE_MAX_EVALUATIONS = "max-evaluations-per-run"   # evaluate requests answered per run (1000)
NODE_MAX_DAILY_EVALUATIONS = "max-evaluations-per-day"   # ... over every run, in a
                                                       # rolling 24 hours (2000)
NODE_MAX_TOTAL_EVALUATIONS = "max-evaluations-total"   # ... over every run, ever (100000)
NODE_MIN_EVAL_SPLIT = "min-eval-split-size"   # smallest count a site reports (10): smaller
                                              # splits "suppressed" only, no training on fewer
NODE_UNLISTED_LABELS = "unlisted-labels"   # label names a job's class list may leave out
NODE_MAX_MODEL_PARAMETERS = "max-model-parameters"  # larger job models are refused (2e9)
NODE_MAX_STUDY_TOKENS = "max-study-tokens"    # backbone tokens of one study (16384)
NODE_MAX_STEP_TOKENS = "max-step-tokens"      # ... of one training step's studies (2^20)
NODE_MAX_STEP_ACTIVATIONS = "max-step-activations"  # tokens x layer widths and heads (2^36)
EVAL_SUPPRESSED = "suppressed"       # f"{split}-suppressed": 1.0 = a count < floor, no metrics
