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

# LeNet-5 on real Fashion-MNIST: float training, 4-bit post-training quantization, 2-bit
# quantization-aware training from the float weights; prints the comparison table and where the
# charts are. The data comes from Debian's package where apt works, else torchvision downloads it.
demo: $(STAMP)
	@test -d $(FASHION_MNIST) || { apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; } >/dev/null 2>&1 \
		|| echo "Debian's dataset-fashion-mnist could not be installed here; the recipe will try torchvision's download"
	$(PY) recipes/lenet_q.py --epochs 8 --qat-epochs 3 --ptq-bits 4 --qat-bits 2 \
		--output-dir demo_out/lenet_q

bench: $(STAMP)
	$(PY) benchmarks/qat_overhead.py
	$(PY) benchmarks/ptq_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
