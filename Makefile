# Two commands, see README: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    := runs/data
STAMP   := $(VENV)/.installed

export FLWR_TELEMETRY_ENABLED = 0
export FLWR_DISABLE_UPDATE_CHECK = 1
export FLWR_HOME = $(CURDIR)/.flwr
export HF_HUB_OFFLINE = 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: demo test install data bench bench-all clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(DATA)/site-0: | $(STAMP)
	$(BIN)/medfed synth --sites 3 --out $(DATA) --seed 0 --external

data: $(DATA)/site-0

demo: $(STAMP) $(DATA)/site-0
	$(BIN)/medfed ingest --data-dir $(DATA)/site-1
	$(BIN)/medfed simulate experiment=demo data.root=$(DATA) federation.external_sites=true

# Two workers, one test file each at a time (module fixtures and in-file order stay
# together): the multi-process tests mostly wait on process start-up and heartbeats.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

bench: $(STAMP)
	$(BIN)/python -m bench.framework_overhead
	$(BIN)/python -m bench.calibration
	$(BIN)/python -m bench.dp_overhead

DP_SEED_RUNS := $(foreach s,0 1 2 3,dp_utility_public_clip_tuned_seed$(s))

bench-all: bench
	$(BIN)/python -m bench.heterogeneity
	$(BIN)/python -m bench.dp_utility --name dp_utility_scratch
	for s in 0 1 2 3; do $(BIN)/python -m bench.dp_utility --public-pretrain clip \
	    --mode linear_probe --tune-lr --seed $$s --name dp_utility_public_clip_tuned_seed$$s; done
	$(BIN)/python -m bench.dp_utility --name dp_utility --combine $(DP_SEED_RUNS)

clean:
	rm -rf runs .flwr
