def dials_version():
    return "DIALS (stand-in for tests)"
