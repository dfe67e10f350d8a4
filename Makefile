# ERNIE 4.5 export toolchain. `make install` once, then `make demo` / `make test-all`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  ?= baidu/ERNIE-4.5-0.3B-PT
OUT    ?= artifacts/ernie-4.5-0.3b
PROFILE ?= reference
SYNTH  ?= checkpoints/synthetic-full
DEMO   ?= artifacts/synthetic-full
PROMPT ?= Hello from ERNIE

.PHONY: install test test-slow test-all demo export synthetic generate serve serve-ray profiles bench bench-peers bench-pairs eval bench-serve moe clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first: a bare `torch` would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,runtime,serve,serve-ray,eval,test]'
	touch $@

test: install  ## the fast suite (tiny models), under 10 minutes on 2 cores
	$(PY) -m pytest -q -m "not slow"

test-slow: install  ## full-size (0.36B) synthetic export, verification and generation
	$(PY) -m pytest -q -m slow

test-all: install  ## everything; what CI runs
	$(PY) -m pytest -q

synthetic: install  ## full-size synthetic checkpoint (RANDOM weights)
	$(PY) -m ernie_export.checkpoint.synthetic --size full --out $(SYNTH)

demo: install  ## offline main job: synthetic full-size checkpoint -> verified ONNX artifact -> generation
	test -f $(SYNTH)/config.json || $(PY) -m ernie_export.checkpoint.synthetic --size full --out $(SYNTH)
	$(PY) -m ernie_export --model $(SYNTH) --out $(DEMO) --overwrite
	$(PY) -m runtime.generate --model $(DEMO) --prompt "$(PROMPT)" --max-new-tokens 32 --greedy --stream
	@echo "(random weights: the text is noise; the timings are real)"

export: install  ## make export MODEL=<dir|hub id> OUT=artifacts/<name> PROFILE=cpu|cpu-int8|cpu-float32|portable|gpu|reference [FLAGS="--block-size 64"]
	$(PY) -m ernie_export --model $(MODEL) --out $(OUT) --profile $(PROFILE) $(FLAGS)

generate: install
	$(PY) -m runtime.generate --model $(OUT) --prompt "$(PROMPT)"

serve: install  ## OpenAI-compatible server on 127.0.0.1:8000 (make serve OUT=artifacts/<name>)
	$(PY) -m runtime.serve --model $(OUT)

REPLICAS ?= 2
ADDRESS  ?=
serve-ray: install  ## N replicas behind Ray Serve's proxy on 127.0.0.1:8000 (make serve-ray OUT=artifacts/<name> REPLICAS=2 [ADDRESS=auto])
	$(PY) -m runtime.serve.ray --model $(OUT) --replicas $(REPLICAS) $(if $(ADDRESS),--address $(ADDRESS))

bench-serve: install  ## aggregate tokens/s and TTFT at 1, 4, 8 concurrent clients on the demo artifact (+ llama.cpp's server once make bench-peers has set it up)
	$(PY) -m tools.bench_serve --model $(DEMO) $(if $(wildcard $(PEERS)/peers.json),--peers $(PEERS)/peers.json --peer f32)

# The presets of runtime/core/profile.py (python -m ernie_export --help lists them); the demo artifact is `reference`.
# gpu is left out on CPU hosts: its float16 graphs are verified on CUDA.
PROFILES ?= cpu cpu-int8 cpu-float32 portable
ARTIFACTS = $(DEMO) $(foreach p,$(PROFILES),$(DEMO)-$(p))
PEERS    ?= $(HOME)/.cache/ernie-peers
profiles: install  ## export the synthetic checkpoint with the reference preset and each preset of PROFILES (skips existing ones)
	test -f $(SYNTH)/config.json || $(PY) -m ernie_export.checkpoint.synthetic --size full --out $(SYNTH)
	test -f $(DEMO)/manifest.json || $(PY) -m ernie_export --model $(SYNTH) --out $(DEMO)
	for p in $(PROFILES); do test -f $(DEMO)-$$p/manifest.json && continue; \
	  $(PY) -m ernie_export --model $(SYNTH) --out $(DEMO)-$$p --profile $$p || exit 1; done

bench: profiles  ## our float32 and quantized profiles beside transformers' eager model, one table
	$(PY) -m tools.bench --model $(ARTIFACTS) --checkpoint $(SYNTH)

EVAL_TEXT ?= README.md
PEER_DIR = $(PEERS)/$(notdir $(SYNTH))
eval: profiles  ## rolling perplexity of the int8 and int4 exports vs float32 on EVAL_TEXT (python -m runtime.eval); llama.cpp's too once make bench-peers has built its files
	for p in cpu-int8 cpu portable; do $(PY) -m runtime.eval --model $(DEMO)-$$p --compare $(DEMO) --text $(EVAL_TEXT) || exit 1; done
	if [ -f $(PEER_DIR)/f32.gguf ]; then for q in q8_0 q4_0; do $(PY) -m tools.peers eval --reference $(PEER_DIR)/f32.gguf \
	  --model $(PEER_DIR)/$$q.gguf --ids-from $(DEMO) --text $(EVAL_TEXT) || exit 1; done; fi

bench-peers: profiles  ## + llama.cpp (f32/q8_0/q4_0) and onnxruntime-genai int4, same checkpoint, one run (not CI: the first setup compiles llama.cpp, ~15 min)
	$(PY) -m tools.peers setup --checkpoint $(SYNTH) --cache $(PEERS)
	$(PY) -m tools.bench --model $(ARTIFACTS) --peers $(PEERS)/peers.json --repeat 3 --json bench-peers.json

bench-pairs: profiles  ## decode and prefill ratios to llama.cpp in the same format, taking turns in one process (after make bench-peers)
	$(PY) -m tools.pairs --model $(ARTIFACTS) --peers $(PEERS)/peers.json --json bench-pairs.json

# ERNIE 4.5 21B-A3B (MoE): a synthetic checkpoint in the real layout (43.7 GB bfloat16, RANDOM weights) unless MOE_CKPT
# holds the real one; the export streams it (peak RSS and disk: README), verifies layer by layer, then generates.
MOE_CKPT    ?= checkpoints/moe-full
MOE_OUT     ?= artifacts/moe-full-$(MOE_PROFILE)
MOE_PROFILE ?= cpu
moe: install  ## ERNIE 4.5 21B-A3B: synthetic full-size checkpoint (if MOE_CKPT has none) -> streamed int4 export, verified layer by layer -> generation
	test -f $(MOE_CKPT)/config.json || $(PY) -m ernie_export.checkpoint.synthetic --arch moe --size full --out $(MOE_CKPT)
	$(PY) -m ernie_export --model $(MOE_CKPT) --out $(MOE_OUT) --profile $(MOE_PROFILE) --overwrite
	$(PY) -m runtime.generate --model $(MOE_OUT) --prompt "$(PROMPT)" --max-new-tokens 32 --greedy --stream
	@echo "(random weights: the text is noise; the timings are real)"

clean:
	rm -rf $(VENV) checkpoints .pytest_cache

.PHONY: install-drivers
install-drivers:  ## Node and browser drivers: system chromium (apt, only when missing), npm ci in drivers/node, drivers/web and drivers/transformersjs; optimum beside the venv (drivers/optimum/site)
	command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium)
	cd drivers/node && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	cd drivers/web && npm ci --no-audit --no-fund
	cd drivers/transformersjs && ONNXRUNTIME_NODE_INSTALL=skip npm ci --no-audit --no-fund
	$(PY) -m pip install -q --no-deps --target drivers/optimum/site -r drivers/optimum/requirements.txt
