// Command etcd is upstream etcd's server (go.etcd.io/etcd/server/v3/etcdmain) built at the
// version pinned in tools/go.mod, so the local cluster runs the etcd 3.6 that Kubernetes pins.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
