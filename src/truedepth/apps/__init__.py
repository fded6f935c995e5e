"""The commands built on the library: search, finetune, compress (search + finetune + measure, through their
public functions only), sweep and demo. Each app keeps its logic and its report apart."""
