"""
The self-healing cluster: a declared number of instances of each service,
kept running across hosts by one elected reconciler (see C{docs/cluster.md}).

    L{skynet.cluster.spec}        the desired state and the C{sky apply} file
    L{skynet.cluster.placement}   pure placement: which instance goes where
    L{skynet.cluster.leader}      leader election among the daemons
    L{skynet.cluster.reconciler}  the leader's loop, acting through the daemons
    L{skynet.cluster.commands}    C{sky apply}, C{scale}, C{undeploy}, ...
"""
