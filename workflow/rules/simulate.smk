# The demo screen: written by the package's generator in the input contract, truth beside it.
# Only part of the DAG when config `screen` is the generator's sheet.
if SCREEN.is_demo:

    rule simulate_demo:
        output:
            sheet=SCREEN.sheet,
            tables=SCREEN.demo_tables(),
        params:
            spec=config["simulate"],
        threads: config["threads"]["simulate"]
        conda:
            MAIN_ENV
        log:
            f"{RESULTS}/logs/simulate_demo.log",
        benchmark:
            f"{RESULTS}/benchmarks/simulate_demo.tsv"
        script:
            "../scripts/simulate.py"
