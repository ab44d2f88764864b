DESCRIPTION = "todo"
def add_arguments(p):
    pass
