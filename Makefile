# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
VENV    ?= .venv
PY      := $(VENV)/bin/python
DEVICE  ?= cpu
STAMP   := $(VENV)/.installed-stamp
# Triton for the JVP kernel's tests (its interpreter runs the kernel on CPU): installed only where torch brought
# none (the CPU wheel), so a CUDA torch keeps its own Triton. 3.9.0's interpreter works with numpy 2.4.
TRITON_PIN    := triton==3.9.0
ENSURE_TRITON := $(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON_PIN)"

.PHONY: install demo reproduce attribution attribution-pilot test teacher smoke clean-outputs gpu-check

install: $(STAMP)

# --system-site-packages keeps a CUDA torch that is already on a GPU machine; on a CPU machine with
# no torch, `torch==2.13.0` resolves to the local CPU wheel instead of gigabytes of CUDA packages.
# DeepSpeed is an sdist that imports torch while building: install it without build isolation
# (DS_BUILD_OPS=0: its CUDA ops are JIT-built on first use on GPU machines).
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -c "import deepspeed" 2>/dev/null || DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation "deepspeed>=0.16"
	$(PY) -m pip install -q -e ".[dev]"
	$(ENSURE_TRITON)
	touch $(STAMP)

test: $(STAMP)
	$(ENSURE_TRITON)
	$(PY) -m pytest -q

# Every GPU measurement of the fused JVP attention kernel (benchmarks/gpu_check.py: kernel vs float64, its time
# and memory beside SDPA and the blocked rule at 16k / 67k tokens, the stage-2 step, stages 0-3 smoke on CUDA).
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out results/gpu_check.json

demo: $(STAMP)
	$(PY) scripts/demo.py --device $(DEVICE)

# The paper's claims at the stage configs' own budgets (3.7 h measured on 2 CPU cores, BENCHMARKS.md §7;
# resumable: rerun after an interruption); results/reproduction/ gets the reports, logs, timings and machine
# (configs/reproduce.yaml).
reproduce: $(STAMP)
	$(PY) scripts/demo.py --config configs/reproduce.yaml --device $(DEVICE)

# Retrain (or continue training) the default teacher into outputs/teacher; see docs/stages.md ("The default world
# and teacher"). Resumes outputs/teacher when its checkpoint is there; `make teacher TEACHER_INIT=assets/teacher`
# instead starts a new run from the shipped weights (fresh optimizer) rather than from scratch. The shipped
# assets/teacher is replaced only when asked explicitly: `make teacher SHIP=1`.
TEACHER_CKPT := outputs/teacher/checkpoints/last.ckpt
TEACHER_INIT ?=
SHIP ?=
ACCEL := $(if $(filter cuda,$(DEVICE)),gpu,cpu)
teacher: $(STAMP)
	test -f data/digits/metadata.json || $(PY) prepare.py --out data/digits
	$(PY) train.py --config configs/teacher_pretrain.yaml --trainer.accelerator $(ACCEL) \
		$$(test -f $(TEACHER_CKPT) && echo --ckpt_path $(TEACHER_CKPT)) \
		$$(test -f $(TEACHER_CKPT) || test -z "$(TEACHER_INIT)" || echo --model.init_args.init_from $(TEACHER_INIT))
ifeq ($(SHIP),1)
	mkdir -p assets/teacher
	cp outputs/teacher/export/model.safetensors outputs/teacher/export/config.json assets/teacher/
	cp outputs/teacher/csv/metrics.csv assets/teacher/training_log$(if $(TEACHER_INIT),_continued).csv
else
	@echo "teacher exported to outputs/teacher/export; assets/teacher is unchanged (make teacher SHIP=1 replaces it)"
endif

smoke: $(STAMP)
	$(PY) train.py --config configs/smoke/teacher_pretrain.yaml

# Which factor explains the Restricted-MeanFlow gap (configs/attribution.yaml: seven stage-2 arms at 1,500 steps
# each from one stage-1 export, stage 3 on MeanFlow's ImageNet recipe, the evaluation at 10 and 20 steps;
# about 4.7 h of a free 2-core CPU; resumable: rerun after an interruption). Results go to results/attribution/.
attribution: $(STAMP)
	$(PY) scripts/demo.py --config configs/attribution.yaml --device $(DEVICE)

# The same arms at the demo's budget, reusing `make demo`'s outputs (configs/attribution_pilot.yaml; ~16 min after
# the demo). Results go to results/attribution_pilot/.
attribution-pilot: $(STAMP)
	$(PY) scripts/demo.py --config configs/attribution_pilot.yaml --device $(DEVICE)
