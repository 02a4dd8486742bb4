# The two commands of the README. Both install what is missing first (scripts/setup.sh, quiet when
# everything is there).
CARGO ?= cargo
KILN_RELEASE := target/release/kiln

.PHONY: setup demo test
setup:
	@scripts/setup.sh

# Builds kiln and shows what it does on the real DeepSeek-V3 configuration: the model summary, the
# compile to a host library and sm_90a PTX with its kernel report, and a small model of the same
# architecture generating on the CPU (the reference interpreter until the runtime executes artifacts).
demo: setup
	$(CARGO) build --release --quiet --bin kiln
	$(KILN_RELEASE) inspect models/deepseek_v3.toml
	$(KILN_RELEASE) compile models/deepseek_v3.toml --target all -o target/demo/deepseek_v3.kiln --report --timings
	$(KILN_RELEASE) run models/tiny.toml --random-weights 1 --interp --prompt-ids 1,2,3,4 --max-new-tokens 8
	$(KILN_RELEASE) doctor

# Every test of the workspace: unit tests, the integration tests in tests/it, doc tests.
test: setup
	$(CARGO) test --workspace --quiet
