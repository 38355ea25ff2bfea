VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: dev test demo bench clean

# First-party plugins under plugins/ are separate distributions, installed editable after the
# package so that tests find them through their entry points.
PLUGINS := plugins/timm_qconv_apot plugins/timm_qconv_report

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q -e plugins/timm_qconv_apot -e "plugins/timm_qconv_report[plot]"
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

FASHION_MNIST := /usr/share/datasets/fashion-mnist

# Post-training: quantize a timm model with the command line and print its report; then a short
# quantization-aware training run of the recipe on real Fashion-MNIST (Debian's package, installed
# when possible; synthetic data otherwise).
demo: $(STAMP)
	$(PY) -m timm_qconv quantize --model resnet18 --bits 4 --functions 32 --iters 50 --out demo_out/resnet18_q4
	$(PY) -m timm_qconv info demo_out/resnet18_q4
	@test -d $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
		|| echo "Fashion-MNIST could not be installed here; the recipe uses synthetic data"
	$(PY) recipes/resnet34_q.py --dataset $$(test -d $(FASHION_MNIST) && echo fashion-mnist || echo synthetic) \
		--epochs 1 --max-steps 60 --batch-size 64 --log-every 20 --output-dir demo_out/resnet34_q

bench: $(STAMP)
	$(PY) benchmarks/qat_overhead.py
	$(PY) benchmarks/ptq_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
