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
	$(PY) -m pytest

demo: $(STAMP)
	$(PY) -m timm_qconv quantize --model resnet18 --bits 4 --functions 32 --iters 50 --out demo_out/resnet18_q4

bench: $(STAMP)
	$(PY) benchmarks/qat_overhead.py
	$(PY) benchmarks/ptq_speed.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
