"""Offline stand-in: the JDK comes from Debian (--host_javabase=@local_jdk in /etc/bazel/bazelrc)."""

def rules_java_dependencies():
    pass

def rules_java_toolchains():
    pass
