// Command dbharness runs FerretDB v1.24 with its SQLite backend as a local,
// throwaway MongoDB-compatible server for development and tests.
//
// It embeds github.com/FerretDB/FerretDB/ferretdb instead of building FerretDB's
// own command, whose version file is missing from the module download.
//
// FerretDB v1 runs a conditional update (findAndModify, update) as a query
// followed by a separate write, so two racing updates can both match the same
// precondition; MongoDB applies each single-document update atomically, and
// users-grpc relies on that. The harness restores the guarantee by passing
// clients to FerretDB through a small proxy that runs one command at a time.
//
// FerretDB's SQLite backend creates its _id index on one expression but looks
// documents up by another, so every lookup by _id scans its table; the proxy
// adds the index those lookups can use (see indexes.go).
package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/FerretDB/FerretDB/ferretdb"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:27017", "TCP address to listen on (port 0 picks a free port)")
	dataDir := flag.String("data-dir", "", "directory for the SQLite files (empty: a temporary directory, removed at exit)")
	flag.Parse()

	// FerretDB's in-memory databases are private to its own connections, where the
	// harness could not add its indexes: a throwaway database lives in a temporary
	// directory instead.
	dir := *dataDir
	if dir == "" {
		temp, err := os.MkdirTemp("", "dbharness-")
		if err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(temp)
		dir = temp
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		log.Fatal(err)
	}
	if err := os.MkdirAll(abs, 0o700); err != nil {
		log.Fatal(err)
	}
	// FerretDB keeps SQLite in WAL mode; synchronous(normal) there skips the fsync of each commit
	// (an update took 3.3 ms, 1.5 ms without). A commit still survives the process being killed;
	// only a crash of the machine itself may lose the last ones. This is a development and test
	// database: production runs on MongoDB.
	sqliteURL := "file:" + abs + "/?_pragma=synchronous(normal)"

	ix := newIndexer(abs)
	// Files left by an earlier run get their indexes before FerretDB serves them.
	ix.indexExisting()

	db, err := ferretdb.New(&ferretdb.Config{
		Listener:  ferretdb.ListenerConfig{TCP: "127.0.0.1:0"},
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

	// MongoDBURI waits until Run has started FerretDB's listener.
	backend := db.MongoDBURI()
	backendAddr := backend[len("mongodb://") : len(backend)-1]

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	p := &proxy{backendAddr: backendAddr, indexer: ix, clients: map[net.Conn]struct{}{}}
	go func() {
		<-ctx.Done()
		// Closing the clients too lets FerretDB stop at once instead of waiting for them.
		listener.Close()
		p.closeClients()
	}()

	// The proxy's listener is bound, so this line is a true readiness signal
	// and names the real port when -listen asked for port 0.
	fmt.Printf("listening mongodb://%s/\n", listener.Addr())

	p.serve(listener)
	<-done
}

// proxy relays each client's commands to FerretDB over a connection of its own,
// one command at a time across all clients.
type proxy struct {
	backendAddr string
	oneAtATime  sync.Mutex
	indexer     *indexer // used only while holding oneAtATime

	mu      sync.Mutex
	clients map[net.Conn]struct{}
}

// serve accepts clients until the listener closes.
func (p *proxy) serve(listener net.Listener) {
	for {
		client, err := listener.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				log.Print(err)
			}
			return
		}
		p.mu.Lock()
		p.clients[client] = struct{}{}
		p.mu.Unlock()
		go func() {
			p.relay(client)
			p.mu.Lock()
			delete(p.clients, client)
			p.mu.Unlock()
		}()
	}
}

func (p *proxy) closeClients() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for client := range p.clients {
		client.Close()
	}
}

func (p *proxy) relay(client net.Conn) {
	defer client.Close()
	backend, err := net.Dial("tcp", p.backendAddr)
	if err != nil {
		log.Print(err)
		return
	}
	defer backend.Close()
	for {
		request, err := readMessage(client)
		if err != nil {
			return
		}
		if err := p.exchange(request, client, backend); err != nil {
			return
		}
	}
}

// exchange sends one request and relays its replies while holding the lock.
func (p *proxy) exchange(request []byte, client, backend net.Conn) error {
	p.oneAtATime.Lock()
	defer p.oneAtATime.Unlock()
	cmd := parseCommand(request)
	if _, err := backend.Write(request); err != nil {
		return err
	}
	if moreToCome(request) {
		p.indexer.after(cmd)
		return nil // the client expects no reply
	}
	for {
		reply, err := readMessage(backend)
		if err != nil {
			return err
		}
		last := !moreToCome(reply)
		if last {
			// Before the client hears back: whatever it does next finds the index.
			p.indexer.after(cmd)
		}
		if _, err := client.Write(reply); err != nil {
			return err
		}
		if last {
			return nil
		}
	}
}

const (
	headerSize     = 16
	maxMessageSize = 48 * 1000 * 1000 // MongoDB's maxMessageSizeBytes
	opMsg          = 2013
	moreToComeBit  = 1 << 1
)

// readMessage reads one wire-protocol message: a little-endian int32 length, then the rest.
func readMessage(r io.Reader) ([]byte, error) {
	var length [4]byte
	if _, err := io.ReadFull(r, length[:]); err != nil {
		return nil, err
	}
	size := binary.LittleEndian.Uint32(length[:])
	if size < headerSize || size > maxMessageSize {
		return nil, fmt.Errorf("bad message length %d", size)
	}
	message := make([]byte, size)
	copy(message, length[:])
	if _, err := io.ReadFull(r, message[4:]); err != nil {
		return nil, err
	}
	return message, nil
}

// moreToCome reports an OP_MSG whose sender will not wait for (or will send more) replies.
func moreToCome(message []byte) bool {
	if len(message) < headerSize+4 || binary.LittleEndian.Uint32(message[12:16]) != opMsg {
		return false
	}
	return binary.LittleEndian.Uint32(message[16:20])&moreToComeBit != 0
}
