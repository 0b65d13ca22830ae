"""fastalex: AlexNet on Tiny ImageNet, fast. `import fastalex` needs neither DALI nor a GPU."""

__version__ = "0.1.0"
