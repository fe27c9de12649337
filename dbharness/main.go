// Command dbharness runs FerretDB v1.24 with its SQLite backend as a local,
// throwaway MongoDB-compatible server for development and tests.
//
// It embeds github.com/FerretDB/FerretDB/ferretdb instead of building FerretDB's
// own command, whose version file is missing from the module download.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on (port 0 picks a free port)")
	dataDir := flag.String("data-dir", "", "directory for the SQLite files (empty: in memory)")
	flag.Parse()

	sqliteURL := "file:" + os.TempDir() + "/?mode=memory"
	if *dataDir != "" {
		abs, err := filepath.Abs(*dataDir)
		if err != nil {
			log.Fatal(err)
		}
		if err := os.MkdirAll(abs, 0o700); err != nil {
			log.Fatal(err)
		}
		sqliteURL = "file:" + abs + "/"
	}

	db, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: *listen},
		Handler:   "sqlite",
		SQLiteURL: sqliteURL,
	})
	if err != nil {
		log.Fatal(err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = db.Run(ctx)
	}()

	// MongoDBURI waits until Run has started the listener, so this line is a
	// true readiness signal and names the real port when -listen asked for 0.
	fmt.Println("listening", db.MongoDBURI())

	<-done
}
