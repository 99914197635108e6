# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: demo moons test install docs

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The main job: train a DDPM with a U-Net on the bundled handwritten digits (offline),
# then draw a grid of samples and the reverse process from noise to digits.
demo: install
	diffkit train examples/digits.yaml --out runs/digits --force
	diffkit sample runs/digits --n 64 --seed 0 --out runs/digits/digits.png --trajectory runs/digits/trajectory.png

# Two moons: a DDPM with an MLP on 2-D points, 5,000 samples as a scatter plot.
moons: install
	diffkit train examples/moons.yaml --out runs/moons --force
	diffkit sample runs/moons --n 5000 --seed 0 --out runs/moons/moons.png

# The full test suite. pytest's exit 5 (no tests collected) counts as a failure.
test: install
	$(PYTHON) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

# The documentation site, built as the tests build it (any broken link fails); `mkdocs serve` previews it.
docs: install
	$(PYTHON) -m mkdocs build --strict
