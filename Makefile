# The two commands of the README. Both install what is missing first (scripts/setup.sh, quiet when
# everything is there).
CARGO ?= cargo
KILN_RELEASE := target/release/kiln

.PHONY: setup demo test install
# Where `make install` puts kiln: $(PREFIX)/bin/kiln.
PREFIX ?= $(HOME)/.local
setup:
	@scripts/setup.sh

# Builds kiln and shows what it does on the real DeepSeek-V3 configuration: the model summary, the
# compile to a host library and sm_90a PTX with its kernel report, then a small model of the same
# architecture compiled for the CPU and generating from its artifact, against the reference
# interpreter in the same run, then a few compiled training steps of it (DeepSeek-V3's bias rule on).
demo: setup
	$(CARGO) build --release --quiet --bin kiln
	$(KILN_RELEASE) inspect models/deepseek_v3.toml
	$(KILN_RELEASE) compile models/deepseek_v3.toml --target all -o target/demo/deepseek_v3.kiln --report --timings
	$(KILN_RELEASE) compile models/tiny.toml --target cpu -o target/demo/tiny.kiln
	$(KILN_RELEASE) run target/demo/tiny.kiln --random-weights 1 --prompt-ids 1,2,3,4 --max-new-tokens 8
	$(KILN_RELEASE) bench run target/demo/tiny.kiln --random-weights 1
	rm -rf target/demo/train
	$(KILN_RELEASE) train models/tiny.toml --random-weights 1 --data tests/goldens/train/tokens.safetensors --batch 4 --steps 5 --bias-update-speed 0.001 --out target/demo/train
	$(KILN_RELEASE) doctor

# Every test of the workspace: unit tests, the integration tests in tests/it, doc tests.
test: setup
	$(CARGO) test --workspace --quiet

# Builds kiln (release) and copies it to $(PREFIX)/bin, which should be on PATH. The binary carries
# LLVM and MLIR; it finds ptxas as `kiln doctor` says (KILN_PTXAS, this checkout's tools/local, PATH).
install: setup
	$(CARGO) build --release --quiet --bin kiln
	install -D -m 755 $(KILN_RELEASE) $(PREFIX)/bin/kiln
	@echo "installed $(PREFIX)/bin/kiln"
	@case ":$$PATH:" in *":$(PREFIX)/bin:"*) ;; *) echo "$(PREFIX)/bin is not on PATH: add it, e.g. echo 'export PATH=\"$(PREFIX)/bin:\$$PATH\"' >> ~/.bashrc";; esac
