package main

import (
	"database/sql"
	"encoding/binary"
	"fmt"
	"log"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"go.mongodb.org/mongo-driver/x/bsonx/bsoncore"
	_ "modernc.org/sqlite" // the driver FerretDB itself uses, registered as "sqlite"
)

// FerretDB v1.24's SQLite backend keeps each collection in a table with one JSON
// column and creates the _id index on the expression _ferretdb_sjson->"_id",
// but it looks documents up with _ferretdb_sjson->'$._id' (metadata.IDColumn):
// in Query when the filter is exactly {_id: <string or ObjectId>}, and in the
// UPDATE and DELETE statements every update, findAndModify and delete ends with.
// SQLite uses an expression index only for the very same expression, so each of
// those scanned the whole table. The harness adds to each collection table an
// index on the expression FerretDB queries with.
//
// Other filters are never pushed down to SQL by this FerretDB version (a filter
// with any other key, or _id with an operator such as $in or a value of another
// type, makes FerretDB read the whole table and match in Go), so no index can
// serve them.
const (
	idLookupExpression = `_ferretdb_sjson->'$._id'`
	// FerretDB reserves the _ferretdb_ prefix: no name it gives a table or an
	// index starts with it, so this one cannot clash with them.
	idIndexPrefix = "_ferretdb_id_"
	// FerretDB's list of the collections in a database file, with their tables.
	collectionsTable = "_ferretdb_collections"
	fileExtension    = ".sqlite"
)

// databaseName is what FerretDB accepts as a database name, and so as a file name.
var databaseName = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,63}$`)

// creatingCommands may create the collection they name (FerretDB v1.24 has no $out).
var creatingCommands = map[string]bool{
	"insert": true, "update": true, "findAndModify": true, "findandmodify": true,
	"create": true, "createIndexes": true,
}

// indexer adds the _id lookup index to each collection table FerretDB creates.
//
// It opens the database file with a connection of its own for each check and
// closes it at once, so it never holds a file that FerretDB may drop. It runs
// between commands, under the proxy's lock; FerretDB's connections use WAL and
// wait for locks, so its open cursors do not get in the way.
type indexer struct {
	dir string
	// known records, per database, the collections found indexed (true) or found
	// missing (false); it is reset where a command drops or renames collections.
	known map[string]map[string]bool
}

func newIndexer(dir string) *indexer {
	return &indexer{dir: dir, known: map[string]map[string]bool{}}
}

// indexExisting indexes every database file already in the directory.
func (ix *indexer) indexExisting() {
	files, err := filepath.Glob(filepath.Join(ix.dir, "*"+fileExtension))
	if err != nil {
		log.Print(err)
		return
	}
	for _, file := range files {
		name := strings.TrimSuffix(filepath.Base(file), fileExtension)
		if databaseName.MatchString(name) {
			ix.index(name, "")
		}
	}
}

// after runs once FerretDB has answered cmd.
func (ix *indexer) after(cmd command) {
	switch cmd.name {
	case "drop":
		delete(ix.known[cmd.db], cmd.collection)
		return
	case "dropDatabase":
		delete(ix.known, cmd.db)
		return
	case "renameCollection":
		clear(ix.known)
		return
	}
	if cmd.collection == "" || !databaseName.MatchString(cmd.db) {
		return
	}
	indexed, seen := ix.known[cmd.db][cmd.collection]
	if indexed || (seen && !creatingCommands[cmd.name]) {
		return
	}
	ix.index(cmd.db, cmd.collection)
}

// index adds the missing indexes to the tables of database db, and records what
// it found, including whether the collection named (if any) exists.
func (ix *indexer) index(db, collection string) {
	collections, err := ix.indexDatabase(db)
	if err != nil {
		log.Printf("indexing database %s: %v", db, err)
		return
	}
	known := map[string]bool{}
	for _, name := range collections {
		known[name] = true
	}
	if collection != "" && !known[collection] {
		known[collection] = false
	}
	ix.known[db] = known
}

// indexDatabase indexes every collection table of database db that lacks the
// index, and returns the names of its collections.
func (ix *indexer) indexDatabase(db string) ([]string, error) {
	path := filepath.Join(ix.dir, db+fileExtension)
	if _, err := os.Stat(path); err != nil {
		return nil, nil // FerretDB has not created this database
	}
	// mode=rw: never create a file FerretDB would then take for a database.
	dsn := (&url.URL{Scheme: "file", Path: path, RawQuery: "mode=rw&_pragma=busy_timeout(10000)"}).String()
	conn, err := sql.Open("sqlite", dsn)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	conn.SetMaxOpenConns(1)

	rows, err := conn.Query(fmt.Sprintf(
		`SELECT name, table_name, EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'index' AND name = ? || table_name) FROM %s`,
		quote(collectionsTable),
	), idIndexPrefix)
	if err != nil {
		return nil, err
	}
	var collections, missing []string
	for rows.Next() {
		var name, table string
		var indexed bool
		if err := rows.Scan(&name, &table, &indexed); err != nil {
			rows.Close()
			return nil, err
		}
		collections = append(collections, name)
		if !indexed {
			missing = append(missing, table)
		}
	}
	if err := rows.Close(); err != nil {
		return nil, err
	}
	if err := rows.Err(); err != nil {
		return nil, err
	}
	for _, table := range missing {
		// Not UNIQUE: FerretDB's own _id index already refuses duplicates, with
		// the error FerretDB knows how to report.
		q := fmt.Sprintf(`CREATE INDEX IF NOT EXISTS %s ON %s (%s)`,
			quote(idIndexPrefix+table), quote(table), idLookupExpression)
		if _, err := conn.Exec(q); err != nil {
			return nil, err
		}
	}
	return collections, nil
}

// quote makes name an SQL identifier.
func quote(name string) string {
	return `"` + strings.ReplaceAll(name, `"`, `""`) + `"`
}

// command is what the harness needs to know of a client's request.
type command struct {
	name       string // the body's first key, such as "find"
	collection string // its value when a string: the collection most commands act on
	db         string // the body's $db
}

const checksumPresentBit = 1 << 0

// parseCommand reads the command of an OP_MSG; anything else gives the zero command.
func parseCommand(message []byte) command {
	if len(message) < headerSize+4 || binary.LittleEndian.Uint32(message[12:16]) != opMsg {
		return command{}
	}
	sections := message[headerSize+4:]
	if binary.LittleEndian.Uint32(message[16:20])&checksumPresentBit != 0 {
		if len(sections) < 4 {
			return command{}
		}
		sections = sections[:len(sections)-4]
	}
	for len(sections) > 0 {
		kind := sections[0]
		sections = sections[1:]
		switch kind {
		case 0: // the body
			body, _, ok := bsoncore.ReadDocument(sections)
			if !ok {
				return command{}
			}
			first, err := body.IndexErr(0)
			if err != nil {
				return command{}
			}
			var cmd command
			cmd.name = first.Key()
			cmd.collection, _ = first.Value().StringValueOK()
			if db, err := body.LookupErr("$db"); err == nil {
				cmd.db, _ = db.StringValueOK()
			}
			return cmd
		case 1: // a document sequence: its size, then the rest
			if len(sections) < 4 {
				return command{}
			}
			size := int(binary.LittleEndian.Uint32(sections[:4]))
			if size < 4 || size > len(sections) {
				return command{}
			}
			sections = sections[size:]
		default:
			return command{}
		}
	}
	return command{}
}
